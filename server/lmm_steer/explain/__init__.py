"""Feature explanations by a larger LMM, as the paper's second step: the images that activate a
feature most, with its activating regions highlighted, sent to an OpenAI-compatible endpoint that
writes what they share (``lmm-steer sae explain``)."""
