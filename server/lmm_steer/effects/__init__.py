"""Features by measured effect: each feature clamped on a multimodal model's image positions over
generated scenes, the answers it makes the model give recorded in its catalog row (``sae effects``)."""
