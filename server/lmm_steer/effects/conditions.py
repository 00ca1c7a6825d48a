"""Conditions by question type: for each type of a split's questions, the SAE feature that fires
somewhere in the prompts of that type and nowhere in the others', so an edit conditioned on it
(``when``) acts on questions of that type alone (conditional activation steering, as CAST
conditions on the prompt). Read on the unedited hook-block output of each whole prompt (image,
question and chat template), exactly where the engine decides a condition."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .clamps import group_by_image

MIN_RECALL = 0.95  # a type's prompts the condition must fire on
MAX_LEAK = 0.05  # the other types' prompts it may fire on


@dataclass(frozen=True)
class Condition:
    type: str
    feature: int
    recall: float  # share of this type's prompts where it fires
    leak: float  # share of the other types' prompts where it fires
    n: int
    n_other: int
    weakest: float  # its smallest peak activation over this type's prompts where it fires

    @property
    def usable(self) -> bool:
        return self.recall >= MIN_RECALL and self.leak <= MAX_LEAK

    def record(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def prompt_peaks(fast, root: Path, items: list[dict], text: bool = False) -> torch.Tensor:
    """``[question, latents]``: each feature's largest activation over each question's prompt, or
    with ``text`` over its text alone (``fast``: an ``effects.clamps.ImageAnswers``)."""
    return prompt_and_text_peaks(fast, root, items)[int(text)]


def prompt_and_text_peaks(fast, root: Path, items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """``prompt_peaks`` over the whole prompts and over their text, from one pass; each image's work
    is dropped once read."""
    whole: list[torch.Tensor | None] = [None] * len(items)
    text: list[torch.Tensor | None] = [None] * len(items)
    for image, members in group_by_image(items).items():
        entry = fast.prepare(root, image, [items[i] for i in members])
        for k, i in enumerate(members):
            whole[i], text[i] = fast.prompt_peaks(entry, k), fast.prompt_peaks(entry, k, text=True)
        fast.forget(image)
    return torch.stack(whole), torch.stack(text)


def by_type(items: list[dict], peaks: torch.Tensor) -> dict[str, Condition]:
    """Per question type, the feature whose firing best tells its prompts from the others' (most
    recall minus leak; ties to the one firing most strongly on its weakest prompt)."""
    fires = peaks > 0
    kinds = [q["type"] for q in items]
    out = {}
    for kind in dict.fromkeys(kinds):
        mine = torch.tensor([k == kind for k in kinds])
        if mine.all():
            continue  # one type only: nothing to tell apart
        recall = fires[mine].float().mean(0)
        leak = fires[~mine].float().mean(0)
        weakest = torch.where(fires[mine], peaks[mine], torch.full_like(peaks[mine], float("inf"))).amin(0)
        weakest = torch.where(torch.isinf(weakest), torch.zeros_like(weakest), weakest)
        score = recall - leak
        best = score.max()
        tied = (score >= best - 1e-9).nonzero().flatten()
        f = int(tied[weakest[tied].argmax()])
        out[kind] = Condition(kind, f, float(recall[f]), float(leak[f]), int(mine.sum()), int((~mine).sum()),
                              float(weakest[f]))
    return out


def find_conditions(fast, root: Path, items: list[dict]) -> dict[str, Condition]:
    """``by_type`` over ``items``' prompts, read through ``fast``."""
    return by_type(items, prompt_peaks(fast, root, items)) if items else {}


CONDITIONED_RULE = "conditioned: the smallest grid value reaching the best rate"
_CHOSEN = ("when", "condition", "rule", "unconditioned")


def conditioned_value(effect: dict) -> dict | None:
    """The grid point a conditioned row steers at: the smallest value reaching the best rate. The
    unconditioned choice gives up rate to keep the other type's answers, which a condition on the
    row's own type keeps by itself. None for a row measured at one value (nothing to choose)."""
    grid = effect.get("grid") or []
    if len(grid) < 2:
        return None
    best = max(g["rate"] for g in grid)
    return min((g for g in grid if g["rate"] >= best), key=lambda g: g["value"])


def with_conditions(rows: list[dict], conditions: dict[str, Condition], meta: dict) -> list[dict]:
    """Effect rows whose ``steer`` record carries the condition of its question type (``when``:
    the value then acts only on prompts asking about that type, as it was measured), where that
    type has a usable one, at the value ``conditioned_value`` chooses (the unconditioned choice kept
    beside it); a row of a type without one is restored to its unconditioned record."""
    out = []
    for row in rows:
        row = {**row}
        steer, effect = row.get("steer"), row.get("effect") or {}
        if isinstance(steer, dict):
            steer = {k: v for k, v in steer.items() if k not in _CHOSEN} | (steer.get("unconditioned") or {})
            cond = conditions.get(effect.get("type"))
            if cond is not None and cond.usable:
                point = conditioned_value(effect)
                if point is not None and point["value"] != steer.get("value"):
                    steer = {**steer, "unconditioned": {k: steer[k] for k in ("value", "rate", "kept_other")
                                                        if k in steer},
                             "value": point["value"], "rate": point["rate"], "kept_other": point["kept_other"]}
                steer |= {"when": cond.feature, "rule": CONDITIONED_RULE, "condition": {**cond.record(), **meta}}
            row["steer"] = steer
        out.append(row)
    return out
