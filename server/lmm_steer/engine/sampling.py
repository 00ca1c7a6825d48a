"""Per-request sampling: greedy, temperature, top-k, top-p, seeded and reproducible.

Each request owns a ``torch.Generator``, so its random draws do not depend on which other
requests share its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no limit
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    ignore_eos: bool = False  # benchmarks want a fixed number of tokens

    def validate(self) -> None:
        def bad(name, why):
            raise SamplingError(f"{name} {why}", name)

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", f"must be a positive integer, got {self.max_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            bad("temperature", f"must be a finite number >= 0, got {self.temperature!r}")
        if not (0 < self.top_p <= 1):
            bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            bad("top_k", f"must be >= 0, got {self.top_k!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "must be non-empty strings")

    @property
    def greedy(self) -> bool:
        # As vLLM: below this temperature, logits / T overflow to infinity and softmax gives NaN,
        # and the distribution is greedy anyway to float precision.
        return self.temperature < GREEDY_BELOW


class SamplingError(ValueError):
    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def make_generator(seed: int | None, device) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id from ``logits [vocab]`` (fp32)."""
    if params.greedy:
        return int(torch.argmax(logits))
    scores = logits / params.temperature
    if params.top_k and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cum = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
        # drop tokens once the mass before them already reaches top_p (always keep the first)
        drop = (cum - torch.softmax(sorted_scores, dim=-1)) >= params.top_p
        drop[0] = False  # a top_p below float32's smallest number rounds to 0 and would drop it too
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_batch(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> list[int]:
    """Token ids for each row of ``logits [B, vocab]``; greedy rows take one batched argmax."""
    greedy = [i for i, p in enumerate(params) if p.greedy]
    out = [0] * len(params)
    if greedy:
        ids = torch.argmax(logits[greedy], dim=-1).tolist()
        for i, t in zip(greedy, ids, strict=True):
            out[i] = t
    for i, p in enumerate(params):
        if not p.greedy:
            out[i] = sample_row(logits[i], p, generators[i])
    return out
