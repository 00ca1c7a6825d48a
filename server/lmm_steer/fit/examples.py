"""Labelled examples: LLaVA-format rows with an image, a question, its answer and its type."""

from __future__ import annotations

import json
from pathlib import Path

from ..scenes.evaluate import questions


def load_examples(path: str | Path, limit: int | None = None, types=("colour", "shape", "exist")) -> tuple[Path, list[dict]]:
    """``(image root, items)``: from a scenes split folder (its ``conversations.jsonl``) or a JSONL
    file of rows ``{"image", "conversations": [human, gpt], "type", "answer"[, "difficulty"]}`` whose
    image paths are relative to the file's folder. ``limit``: scenes (distinct images) at most."""
    path = Path(path)
    if path.is_dir():
        return path, questions(path, limit, types)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    keep = set(sorted({r["image"] for r in rows})[:limit]) if limit else None
    items = []
    for r in rows:
        if r.get("type") not in types or (keep is not None and r["image"] not in keep):
            continue
        items.append({"image": r["image"], "type": r["type"], "difficulty": r.get("difficulty") or [],
                      "question": r["conversations"][0]["value"].removeprefix("<image>\n"),
                      "answer": r.get("answer", r["conversations"][1]["value"])})
    return path.parent, items
