"""Explaining many features: resumable (a feature already explained or found unexplainable is
skipped), concurrent, each finished row appended to the output at once so a stopped run loses
nothing; the output is a catalog ``serve --catalog`` loads."""

from __future__ import annotations

import json
import random
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from .explainer import Explainer, ExplainerError
from .highlight import highlight

DONE = ("ok", "unable")


def parse_features(spec: str, rows: dict[int, dict]) -> list[int]:
    """``all``, ``top-N`` (the N whose best example activates them most), ``sample-N`` (N drawn at
    random, seed 0, in id order: a fair sample where explaining all would take too long) or
    ``ID,ID,...``."""
    spec = spec.strip()
    if spec == "all":
        return sorted(rows)
    counted = re.fullmatch(r"(top|sample)-(\d+)", spec)
    if counted and int(counted[2]) > 0:
        n = int(counted[2])
        if counted[1] == "top":
            return sorted(rows, key=lambda f: -_peak(rows[f]))[:n]
        return sorted(random.Random(0).sample(sorted(rows), min(n, len(rows))))
    try:
        ids = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--features: expected all, top-N, sample-N or comma-separated ids, got {spec!r}") from None
    if not ids:
        raise ValueError("--features: no feature ids given")
    missing = [f for f in ids if f not in rows]
    if missing:
        raise ValueError(f"--features: {missing[:5]} never fire on the data, so there is nothing to show")
    return ids


def _peak(row: dict) -> float:
    scores = [im.get("activation", 0.0) for im in row.get("top_images", [])]
    scores += [c.get("activation", 0.0) for c in row.get("top_contexts", [])]
    return max(scores, default=0.0)


def read_rows(path: Path) -> dict[int, dict]:
    """Rows of a (possibly interrupted) output; a feature written twice keeps its last row."""
    rows = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[int(row["feature"])] = row
    return rows


def write_rows(path: Path, rows: dict[int, dict]) -> None:
    """The catalog, one row per feature in feature order, replaced atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(rows[f]) + "\n" for f in sorted(rows)))
    tmp.replace(path)


def explain_row(explainer: Explainer, row: dict, per_image: bool) -> tuple[str | None, str]:
    if row.get("top_images"):
        images = []
        for entry in row["top_images"]:
            with Image.open(entry["image"]) as im:
                images.append(highlight(im, entry["grid"]))
        return explainer.explain_images(images, per_image=per_image), "images"
    contexts = [c["text"] for c in row.get("top_contexts", [])]
    return explainer.explain_text(contexts), "text"


def explain_all(explainer: Explainer, rows: dict[int, dict], features: list[int], out: Path, *,
                per_image: bool = False, concurrency: int = 4, progress=None) -> dict:
    """Explain ``features`` of ``rows`` into ``out``; returns the run's summary."""
    done = {f: r for f, r in read_rows(out).items() if r.get("explainer", {}).get("status") in DONE}
    todo = [f for f in features if f not in done]
    lock = threading.Lock()
    counts = {"ok": 0, "unable": 0, "failed": 0, "skipped": len(features) - len(todo)}
    out.parent.mkdir(parents=True, exist_ok=True)

    def one(feature: int) -> None:
        row = dict(rows[feature])
        meta = {"model": explainer.cfg.model, "mode": "per-image" if per_image else "together"}
        try:
            text, meta["input"] = explain_row(explainer, row, per_image)
            meta["status"] = "ok" if text else "unable"
            row["explanation"] = text or ""
        except (ExplainerError, OSError) as e:
            meta.update(status="failed", error=str(e)[:300])
        row["explainer"] = meta
        with lock:
            counts[meta["status"]] += 1
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
            if progress:
                progress(sum(counts[k] for k in ("ok", "unable", "failed")), len(todo))

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        list(pool.map(one, todo))
    write_rows(out, {**rows, **read_rows(out)})
    return {"features": len(features), **counts, **{k: explainer.stats[k] for k in
            ("requests", "retries", "prompt_tokens", "completion_tokens")}}
