"""The model's greedy answers to a split's questions under many steerings at once, through the
fastest path that gives the engine's answers.

A steering is ``None`` (unsteered), a ``SteeringSpec``, or a tensor ``[D]`` added to the hook
block's output at every image position (the difference-of-means control). Where the model allows
it and every steering is a delta edit (any scope) or a vector, ``effects.clamps.ImageAnswers``
computes each image's prefix once and answers every question about it under a batch of steerings
(about a tenth of the engine's cost on the scenes model); anything else goes through the engine,
one steering at a time."""

from __future__ import annotations

from pathlib import Path

import torch

from ..effects.clamps import ImageAnswers
from ..engine import SteeringSpec
from .codes import batched_answers, request

MAX_TOKENS = 6

Steering = SteeringSpec | torch.Tensor | None


def ask(engine, root: Path, items: list[dict], spec: SteeringSpec | None, max_tokens: int = MAX_TOKENS,
        system: str | None = None) -> list[str]:
    """Greedy answers through the engine, every question with the same steering (or system prompt)."""
    reqs = [request(root, item, spec, max_tokens, system) for item in items]
    return [r.text for r in engine.generate(reqs)] if reqs else []


class SplitAnswers:
    """``answers(items, steerings) -> [steering][item]`` for the questions of one split (``root``),
    with an optional system prompt before every question."""

    def __init__(self, engine, root: Path, *, system: str | None = None, max_tokens: int = MAX_TOKENS,
                 batch: int = 16, fast: bool = True) -> None:
        self.engine, self.root, self.system, self.max_tokens = engine, Path(root), system, max_tokens
        self.fast = ImageAnswers(engine, max_tokens, batch, system) if fast and ImageAnswers.supported(engine) else None

    def __call__(self, items: list[dict], steerings: list[Steering]) -> list[list[str]]:
        if not items or not steerings:
            return [[] for _ in steerings]
        if self.fast is not None and all(ImageAnswers.takes(s) for s in steerings):
            return self.fast.answers(self.root, items, steerings)
        out = []
        for steering in steerings:
            if isinstance(steering, torch.Tensor):
                if self.system:
                    raise ValueError("a vector on the image and a system prompt together need the fast path")
                out.append(batched_answers(self.engine, self.root, items, max_tokens=self.max_tokens,
                                           add_on_image=steering))
            else:
                out.append(ask(self.engine, self.root, items, steering, self.max_tokens, self.system))
        return out
