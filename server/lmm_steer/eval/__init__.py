"""Evaluations with fixed sets and same-run baselines (``lmm-steer eval ...``)."""
