"""``lmm-steer sae effects``: measure what each candidate feature's clamp on the image makes a scenes
model say, and write the catalog rows (effect and steering value) that serve merges;
``lmm-steer sae conditions``: give those rows the condition of their question type (``when``)."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

CONDITION_SCENES = 40
CONDITION_TYPES = ("colour", "shape", "exist", "count", "left", "right")


def add_effects_arguments(p: argparse.ArgumentParser) -> None:
    from ..scenes.commands import add_scene_engine_arguments
    from .measure import EffectConfig

    d = EffectConfig()
    add_scene_engine_arguments(p)
    p.add_argument("--catalog", action="append", default=[], metavar="PATH",
                   help="catalog whose search by meaning proposes candidates (repeatable; default: the shipped "
                        "SAE's catalogs, an effects file among them ignored)")
    p.add_argument("--data", required=True, help="a `scenes generate` split of a seed never used for training or "
                                                 "testing (its questions are asked, its masks localise values)")
    p.add_argument("--out", required=True, help="effect rows (JSONL) to write, one per measured feature")
    p.add_argument("--values", help="colour and shape values to find features for, comma-separated (default: all 15)")
    p.add_argument("--grid", default=",".join(f"{v:g}" for v in d.grid), help="clamp values tried on the finalists")
    p.add_argument("--screen-value", type=float, default=d.screen_value, help="clamp value every candidate is screened at")
    p.add_argument("--hits", type=int, default=d.hits, help="search hits per value word taken as candidates")
    p.add_argument("--localised", type=int, default=d.localised,
                   help="features per value taken as candidates by patch IoU with its objects (0: none)")
    p.add_argument("--neighbours", type=int, default=d.neighbours,
                   help="features per value taken as candidates by decoder cosine to its best-localised one (0: none)")
    p.add_argument("--localise-scenes", type=int, default=d.localise_scenes, help="scenes the IoU is measured on")
    p.add_argument("--screen-scenes", type=int, default=d.screen_scenes, help="scenes each candidate is screened on")
    p.add_argument("--finalists", type=int, default=d.finalists, help="per value, screened candidates measured on the grid")
    p.add_argument("--grid-scenes", type=int, default=d.grid_scenes,
                   help="scenes after the screen's that the finalists are measured on")
    p.add_argument("--kept-bound", type=float, default=d.kept_bound,
                   help="share of the other type's right answers a chosen value must keep")
    p.add_argument("--rate-target", type=float, default=d.rate_target,
                   help="share of questions a chosen value should turn; where no value keeping --kept-bound reaches "
                        "it, the value with the best rate x kept is chosen")
    p.add_argument("--batch", type=int, default=16, help="clamps run together on one image")
    p.add_argument("--condition-scenes", type=int, default=CONDITION_SCENES,
                   help="scenes whose prompts the rows' conditions by question type are read on (0: no conditions)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 is faster on a busy machine)")
    p.add_argument("--json", metavar="PATH", help="write the whole measurement (every candidate's effect) here")
    p.add_argument("--markdown", metavar="PATH")


def effects_command(args) -> int:
    import torch

    from sae_weights import FeatureCatalog
    from sae_weights.default import sources_for

    from ..concepts.semantic import index_or_none
    from ..engine import EngineConfig
    from ..eval.commands import fail, split_error
    from ..scenes.commands import scene_engine
    from .clamps import answerer
    from .conditions import with_conditions
    from .measure import EffectConfig, catalog_row, markdown, measure_effects

    if error := split_error("data", args.data):
        return fail(error)
    try:
        grid = tuple(sorted({float(v) for v in args.grid.split(",") if v}))
    except ValueError:
        return fail(f"--grid: {args.grid!r}: comma-separated numbers")
    if not grid or min(grid) <= 0:
        return fail(f"--grid: {args.grid!r}: every value must be positive")
    for flag in ("hits", "screen_scenes", "grid_scenes", "finalists", "batch"):
        if getattr(args, flag) < 1:
            return fail(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    for flag in ("localised", "neighbours"):
        if getattr(args, flag) < 0:
            return fail(f"--{flag} must be at least 0, got {getattr(args, flag)}")
    from ..eval.tested import VALUE_KEYS

    keys = VALUE_KEYS
    if args.values:
        wanted = [v.strip() for v in args.values.split(",") if v.strip()]
        keys = tuple(k for k in VALUE_KEYS if k.split(":", 1)[1] in wanted)
        if len(keys) != len(set(wanted)):
            known = ", ".join(k.split(":", 1)[1] for k in VALUE_KEYS)
            return fail(f"--values: {args.values!r}: choose from {known}")
    if args.threads:
        torch.set_num_threads(args.threads)
    sources = sources_for(args.model, args.sae, args.hookpoint, args.catalog)
    paths = [p for p in sources.catalogs if not Path(p).name.startswith("effects")]  # candidates by meaning alone
    if not paths:
        return fail("--catalog: the SAE has no shipped catalog; name one")
    catalog = FeatureCatalog.load_all(paths)
    searcher = index_or_none(catalog, paths, warn=lambda m: print(f"lmm-steer: {m}", file=sys.stderr)) or catalog
    t0 = time.perf_counter()
    engine = scene_engine(args.model, args.weights, sources.sae, sources.hookpoint, EngineConfig(max_batch=16))
    # the conditions first: a row conditioned on its type breaks the other type only where the
    # condition fires, which decides which screened features are worth the grid
    conditions = _conditions(engine, Path(args.data), args.condition_scenes) if args.condition_scenes > 0 else {}
    cfg = EffectConfig(grid=grid, screen_value=args.screen_value, hits=args.hits, localised=args.localised,
                       neighbours=args.neighbours,
                       localise_scenes=args.localise_scenes, screen_scenes=args.screen_scenes,
                       finalists=args.finalists, grid_scenes=args.grid_scenes, kept_bound=args.kept_bound,
                       rate_target=args.rate_target, keys=keys,
                       leaks={t: c.leak for t, c in conditions.items() if c.usable})

    def progress(stage, done, total, seconds):
        print(f"\reffects: {stage} {done}/{total}, {seconds:.0f} s", end="", file=sys.stderr, flush=True)

    result = measure_effects(answerer(engine, batch=args.batch), searcher, Path(args.data), cfg, progress=progress)
    print(file=sys.stderr)
    result["timing"]["with_load_s"] = round(time.perf_counter() - t0, 1)
    result["timing"]["threads"] = torch.get_num_threads()
    info = json.loads((Path(args.data) / "annotations.json").read_text()).get("info", {})
    called = sys.argv[sys.argv.index("effects") + 1:] if "effects" in sys.argv else ["--data", args.data, "..."]
    meta = {"data": info.get("description", str(args.data)), "command": "lmm-steer sae effects " + " ".join(called),
            "date": datetime.date.today().isoformat()}
    rows = [catalog_row(f, e, meta) for f, e in sorted(result["features"].items())]
    if conditions:
        rows = with_conditions(rows, conditions, meta)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = markdown(result, rows)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": meta["command"], "date": meta["date"], **{
            k: ({str(f): e for f, e in v.items()} if k == "features" else v) for k, v in result.items()}}, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(table)
    print(json.dumps({"written": args.out, "features": len(rows), "steering": sum("steer" in r for r in rows),
                      "seconds": result["timing"]["total_s"]}))
    return 0


def _conditions(engine, data: Path, scenes: int):
    """The conditions by question type, read on ``data``'s first ``scenes`` scenes."""
    from ..scenes.evaluate import questions
    from .clamps import ImageAnswers
    from .conditions import find_conditions

    return find_conditions(ImageAnswers(engine), data, questions(data, scenes, CONDITION_TYPES))


def add_conditions_arguments(p: argparse.ArgumentParser) -> None:
    from ..scenes.commands import add_scene_engine_arguments

    add_scene_engine_arguments(p)
    p.add_argument("--data", required=True, help="a `scenes generate` split of a seed never used for training or "
                                                 "testing (its questions' prompts are read)")
    p.add_argument("--effects", required=True, help="effect rows (JSONL, from `sae effects`) to give conditions")
    p.add_argument("--out", help="where to write the rows (default: --effects, rewritten)")
    p.add_argument("--scenes", type=int, default=CONDITION_SCENES, help="scenes whose prompts are read")
    p.add_argument("--threads", type=int, help="torch CPU threads")


def conditions_command(args) -> int:
    import torch

    from ..engine import EngineConfig
    from ..eval.commands import fail, split_error
    from ..scenes.commands import scene_engine
    from .clamps import ImageAnswers
    from .conditions import with_conditions

    if error := split_error("data", args.data):
        return fail(error)
    if args.scenes < 1:
        return fail(f"--scenes must be at least 1, got {args.scenes}")
    try:
        rows = [json.loads(line) for line in Path(args.effects).read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        return fail(f"--effects: {args.effects}: {e}")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    engine = scene_engine(args.model, args.weights, args.sae, args.hookpoint, EngineConfig(max_batch=16))
    if not ImageAnswers.supported(engine):
        return fail(f"--model: {args.model}: conditions are read block by block, on LLaVA-family models only")
    called = sys.argv[sys.argv.index("conditions") + 1:] if "conditions" in sys.argv else ["--data", args.data, "..."]
    info = json.loads((Path(args.data) / "annotations.json").read_text()).get("info", {})
    meta = {"data": info.get("description", str(args.data)), "command": "lmm-steer sae conditions " + " ".join(called),
            "date": datetime.date.today().isoformat()}
    conditions = _conditions(engine, Path(args.data), args.scenes)
    rows = with_conditions(rows, conditions, meta)
    out = Path(args.out or args.effects)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(json.dumps({"written": str(out), "conditions": {k: {**c.record(), "usable": c.usable}
                                                           for k, c in conditions.items()},
                      "rows_conditioned": sum("when" in (r.get("steer") or {}) for r in rows),
                      "seconds": round(time.perf_counter() - t0, 1)}))
    return 0
