"""Synthetic scenes with exact ground truth: the multimodal testbed (issue #16)."""
