"""The non-SAE control: a difference-of-means direction at the hook block (AxBench's DiffMean),
fitted on the same labelled examples and chosen on the same selection questions as the preset.

The direction is the block output's mean over image positions for questions answered right,
minus its mean for those answered wrong; it is added at every image position, times a strength
from a grid, and the strength with the most fixed minus broken answers (within the same per-type
bound) is kept."""

from __future__ import annotations

import torch

from ..eval.preset import tally
from .search import MAX_LOSS, SCREEN_IMAGES, Trial, screening_set

STRENGTHS = (1.0, 2.0, 4.0, 8.0)


def direction(residual: torch.Tensor, right: list[bool]) -> torch.Tensor:
    mask = torch.tensor(right, dtype=torch.bool)
    if mask.all() or not mask.any():
        return torch.zeros(residual.shape[1])
    return residual[mask].mean(0) - residual[~mask].mean(0)


def choose_strength(answer, items: list[dict], base: list[str], vector: torch.Tensor, *,
                    strengths=STRENGTHS, max_loss: float = MAX_LOSS, screen_images: int = SCREEN_IMAGES,
                    progress=None) -> dict:
    """``{"strength": s, "helped": bool, "screened": [...], "selection": row}``: each strength
    screened as the preset's points are, the best (by the same rule; the least harmful when none
    helps: a control is measured either way) asked on every selection question.
    ``answer(items, steerings)``: as ``search.choose``'s, steerings here being vectors added on the image."""
    screen = screening_set(items, screen_images)
    few, few_base = [items[i] for i in screen], [base[i] for i in screen]
    screened = []
    for s, said in zip(strengths, answer(few, [s * vector for s in strengths]), strict=True):
        screened.append(Trial("diffmean", 0, "add", s, "image", None, tally(few, few_base, said)))
        if progress:
            progress(screened[-1])
    best = min(screened, key=lambda t: (not t.feasible(max_loss), -t.net, t.strength))
    if len(screen) == len(items):  # the screen was the whole split
        full = best
    else:
        said = answer(items, [best.strength * vector])[0]
        full = Trial("diffmean", 0, "add", best.strength, "image", None, tally(items, base, said))
    return {"strength": best.strength, "helped": full.feasible(max_loss) and full.net > 0,
            "screened": [t.row() for t in screened], "selection": full.row()}
