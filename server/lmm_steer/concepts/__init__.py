"""Concepts: find features by meaning (sentence embeddings over the catalog), calibrate their
steering strengths, and resolve a named concept into feature edits."""
