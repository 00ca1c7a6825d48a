"""``lmm-steer eval steer``, ``eval fix`` and ``eval preset``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from sae_weights.default import TEXT_CATALOG, TEXT_MODEL, TEXT_SAE, hookpoint_for

from ..engine.factory import add_device_arguments
from ..scenes.commands import add_scene_engine_arguments
from .fitted import ROWS as FITTED_ROWS
from .steer import CONDITIONS, HELD_OUT


def add_steer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concepts", default=str(HELD_OUT),
                   help="concept list (JSON: concepts -> words, prompts); default: the held-out list")
    p.add_argument("--model", default=TEXT_MODEL)
    p.add_argument("--sae", default=str(TEXT_SAE))
    p.add_argument("--hookpoint", default=None)
    p.add_argument("--catalog", default=str(TEXT_CATALOG))
    p.add_argument("--conditions", default=",".join(CONDITIONS), help=f"comma-separated, of {', '.join(CONDITIONS)}")
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the recorded runs)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of the first prompt (the next get +1, +2)")
    p.add_argument("--strength", type=float, default=1.0, help="concept steering strength")
    p.add_argument("--max-features", type=int, default=1, help="features per concept")
    p.add_argument("--judge", metavar="URL", help="OpenAI-compatible endpoint (…/v1) of an LLM judge")
    p.add_argument("--judge-model", default="judge")
    p.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the judge's API key")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--markdown", metavar="PATH")
    add_device_arguments(p)


def steer_command(args) -> int:
    from sae_weights import FeatureCatalog

    from ..concepts.embedder import default_embedder
    from ..concepts.semantic import SemanticIndex
    from ..engine import EngineConfig
    from ..engine.factory import build_engine
    from .steer import Judge, load_concepts, markdown, run, summarise

    conditions = [c for c in args.conditions.split(",") if c]
    unknown = sorted(set(conditions) - set(CONDITIONS))
    if unknown:
        print(f"lmm-steer: error: unknown conditions {unknown} (known: {', '.join(CONDITIONS)})", file=sys.stderr)
        return 2
    hookpoint = hookpoint_for(args.sae, args.hookpoint)
    engine = build_engine(args.model, args.sae, hookpoint=hookpoint, dtype=args.dtype, device=args.device,
                          config=EngineConfig(max_batch=32, max_seq_len=256))
    catalog = FeatureCatalog.load(args.catalog)
    index = SemanticIndex(catalog, default_embedder(), args.catalog)
    judge = None
    if args.judge:
        judge = Judge(args.judge, args.judge_model, os.environ.get(args.api_key_env) if args.api_key_env else None)
    records = run(engine, catalog, index, load_concepts(args.concepts), conditions, max_tokens=args.max_tokens,
                  strength=args.strength, max_features=args.max_features, judge=judge,
                  temperature=args.temperature, seed=args.seed)
    summary = summarise(records)
    table = markdown(summary)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": sys.argv[1:], "summary": summary,
                                               "records": [r.__dict__ for r in records]}, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0


def fail(message: str) -> int:
    """A bad argument: said on stderr, naming the flag; exit status 2, as argparse's own."""
    print(f"lmm-steer: error: {message}", file=sys.stderr)
    return 2


def split_error(flag: str, path: str | None) -> str | None:
    """Why ``path``, given as ``--flag``, is not a `scenes generate` split (None: it is, or not given)."""
    if path is not None and not (Path(path) / "annotations.json").exists():
        return f"--{flag} {path}: no annotations.json (make it with `scenes generate`)"
    return None


def add_fix_arguments(p: argparse.ArgumentParser) -> None:
    from .fix import FIX_TYPES

    add_scene_engine_arguments(p)
    p.add_argument("--catalog", action="append", default=[], metavar="PATH",
                   help="catalog whose search chooses the features (repeatable; default: the shipped SAE's)")
    p.add_argument("--data", required=True, help="a `scenes generate` directory made with a seed training never used")
    p.add_argument("--select", help="another split (another seed) where the oracle row chooses features from ground "
                                    "truth and the search-tested row tests search hits; without it neither row")
    p.add_argument("--limit", type=int, help="the first N scenes of --data only")
    p.add_argument("--select-scenes", type=int, default=100, help="scenes of --select the oracle reads")
    p.add_argument("--types", default=",".join(FIX_TYPES), help=f"comma-separated, of {', '.join(FIX_TYPES)}")
    p.add_argument("--features", type=int, default=1, help="search hits edited per attribute value")
    p.add_argument("--test-hits", type=int, default=6,
                   help="search hits per value the search-tested row tries on --select (0: no such row)")
    p.add_argument("--test-questions", type=int, default=6,
                   help="questions of --select per type each tried hit is clamped on")
    p.add_argument("--test-strengths", metavar="F,F,...",
                   help="strengths each tried hit is clamped at, comma-separated; the search-tested row keeps the "
                        "best (hit, strength) pair per value, so its strength is chosen on --select "
                        "(default: --strength alone)")
    p.add_argument("--test-gated", action="store_true",
                   help="try the hits as the run uses them: gated by the asked object's localised feature on each "
                        "--select question (needs --gate localised)")
    p.add_argument("--strength", type=float, default=1.0,
                   help="multiplies each amplifying edit's value (the feature's calibrated value, else 3x its "
                        "largest activation); with --amplify scale it is the factor, with transfer it multiplies "
                        "the ratio of the two features' largest activations; suppression stays 0")
    p.add_argument("--amplify", default="clamp", choices=("clamp", "scale", "transfer"),
                   help="clamp: set the feature to its value on every position in scope; scale: multiply its own "
                        "activation by --strength, so only where it already fires; transfer: write it where the "
                        "wrong value's feature fired, from that feature's activation (a swap: only the positions "
                        "the model read as the wrong value change; the search-tested row still tests hits by clamp)")
    p.add_argument("--scope", default="image", choices=("image", "all", "prompt", "generated"),
                   help="positions the edits touch")
    p.add_argument("--gate", default="none", choices=("none", "asked", "localised"),
                   help="asked: gate each edit (where) by the feature of the question's other named value, the "
                        "one that picks out the asked object, so it acts only where that feature fires (each row "
                        "chooses the gate as it chooses its features; no paper row); localised: every row's gate "
                        "is the oracle's feature for that value, the one whose firing patches best cover its "
                        "objects on --select (ground truth of that split; needs --select)")
    p.add_argument("--seed", type=int, default=0, help="draws the random-feature control")
    p.add_argument("--json", metavar="PATH", help="write the result, every case included, here")
    p.add_argument("--markdown", metavar="PATH")


def fix_command(args) -> int:
    from sae_weights import FeatureCatalog
    from sae_weights.default import sources_for

    from ..concepts.semantic import index_or_none
    from ..engine import EngineConfig
    from ..scenes.commands import scene_engine
    from .fix import FIX_TYPES, markdown, run

    types = [t for t in args.types.split(",") if t]
    if not types or set(types) - set(FIX_TYPES):
        return fail(f"--types: {args.types!r}: choose from {', '.join(FIX_TYPES)}")
    for flag in ("data", "select"):
        if error := split_error(flag, getattr(args, flag)):
            return fail(error)
    for flag, value in (("--limit", args.limit), ("--features", args.features), ("--select-scenes", args.select_scenes),
                        ("--test-questions", args.test_questions)):
        if value is not None and value < 1:
            return fail(f"{flag} must be at least 1, got {value}")
    if args.gate == "localised" and not args.select:
        return fail("--gate localised: the gates are chosen on --select's ground truth; give --select")
    if args.test_hits < 0:
        return fail(f"--test-hits must be at least 0, got {args.test_hits}")
    if not args.strength > 0:
        return fail(f"--strength must be positive, got {args.strength}")
    try:
        test_strengths = tuple(float(f) for f in args.test_strengths.split(",") if f) if args.test_strengths else None
    except ValueError:
        return fail(f"--test-strengths: {args.test_strengths!r}: comma-separated numbers")
    if test_strengths is not None and (not test_strengths or min(test_strengths) <= 0):
        return fail(f"--test-strengths: {args.test_strengths!r}: every strength must be positive")
    if args.test_gated and args.gate != "localised":
        return fail("--test-gated: the hits are tried under the localised gates; give --gate localised")
    sources = sources_for(args.model, args.sae, args.hookpoint, args.catalog)
    if not sources.catalogs:
        return fail("--catalog: the SAE has no shipped catalog; name one")
    catalog = FeatureCatalog.load_all(sources.catalogs)
    engine = scene_engine(args.model, args.weights, sources.sae, sources.hookpoint, EngineConfig(max_batch=16))
    searcher = index_or_none(catalog, list(sources.catalogs)) or catalog  # else search by words alone
    oracle = tested = None
    if args.select:
        from ..scenes.localise import best_features
        from .tested import tested_choice

        oracle = best_features(engine, Path(args.select), args.select_scenes)
        if args.test_hits:
            gate_for = None
            if args.test_gated:
                from .fix import Target, asked_gates

                def gate_for(item, key):
                    return asked_gates(item, [Target(key, +1)], oracle.get).get(key)
            tested = tested_choice(engine, searcher, catalog, Path(args.select), candidates=args.test_hits,
                                   per_type=args.test_questions, strength=args.strength,
                                   amplify="clamp" if args.amplify == "transfer" else args.amplify,
                                   scope=args.scope, strengths=test_strengths, gate_for=gate_for)
    result = run(engine, catalog, searcher, Path(args.data), oracle=oracle, limit=args.limit, types=types,
                 per_value=args.features, scope=args.scope, seed=args.seed, strength=args.strength, amplify=args.amplify,
                 gate=args.gate,
                 tested={k: v["feature"] for k, v in tested.items()} if tested is not None else None,
                 tested_strengths={k: v["strength"] for k, v in tested.items()} if tested is not None else None)
    result["search"] = "meaning" if searcher is not catalog else "words"
    if tested is not None:
        result["tested"] = tested
    table = markdown(result)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": sys.argv[1:], **result}, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0


def add_preset_arguments(p: argparse.ArgumentParser) -> None:
    from .preset import SCALES

    p.add_argument("--presets", required=True, metavar="PATH", help="a preset file or directory (as `serve --presets`)")
    p.add_argument("--preset", required=True, metavar="NAME", help="the preset to calibrate")
    p.add_argument("--select", required=True, help="a `scenes generate` split where the factor is chosen")
    p.add_argument("--data", required=True, help="another split (another seed) where the choice is measured")
    p.add_argument("--types", default="colour,shape", help="question types asked, comma-separated")
    p.add_argument("--scales", default=",".join(f"{s:g}" for s in SCALES),
                   help="factors tried on the preset's values, comma-separated")
    p.add_argument("--select-limit", type=int, help="the first N scenes of --select only")
    p.add_argument("--limit", type=int, help="the first N scenes of --data only")
    add_scene_engine_arguments(p)
    p.add_argument("--write", metavar="PATH", help="write the preset with the chosen factor here (JSON), if one is chosen")
    p.add_argument("--name", help="the written preset's name (default: NAME-calibrated)")
    p.add_argument("--json", metavar="PATH", help="write every table here")
    p.add_argument("--markdown", metavar="PATH")


def named_preset(args):
    """The preset ``--preset`` names in ``--presets``, or the message saying why there is none."""
    from ..presets import PresetError, load_presets

    try:
        presets = load_presets(args.presets)
    except PresetError as e:
        return f"--presets: {e}"
    if args.preset not in presets:
        return f"--preset: no preset {args.preset!r} in {args.presets} (there: {', '.join(sorted(presets))})"
    return presets[args.preset]


def preset_command(args) -> int:
    from ..engine import EngineConfig
    from ..presets import feature_spec
    from ..scenes.commands import scene_engine
    from ..scenes.evaluate import TYPES
    from .preset import calibrated_preset, markdown, run

    preset = named_preset(args)
    if isinstance(preset, str):
        return fail(preset)
    if preset.steering.concepts or not preset.steering.features:
        return fail(f"--preset: {args.preset!r} must steer by feature edits alone (concepts need the server's search)")
    for flag in ("select", "data"):
        if error := split_error(flag, getattr(args, flag)):
            return fail(error)
    if Path(args.select).resolve() == Path(args.data).resolve():
        return fail("--select and --data are the same split: choose on one, measure on another")
    types = [t for t in args.types.split(",") if t]
    if not types or set(types) - set(TYPES):
        return fail(f"--types: {args.types!r}: choose from {', '.join(TYPES)}")
    try:
        scales = sorted({float(s) for s in args.scales.split(",") if s})
    except ValueError:
        return fail(f"--scales: {args.scales!r}: comma-separated numbers")
    if not scales or min(scales) <= 0:
        return fail(f"--scales: {args.scales!r}: every factor must be positive")
    for flag, value in (("--limit", args.limit), ("--select-limit", args.select_limit)):
        if value is not None and value < 1:
            return fail(f"{flag} must be at least 1, got {value}")
    # no catalog is searched here, so the engine resolves the SAE itself (the model's shipped one by default)
    engine = scene_engine(args.model, args.weights, args.sae, args.hookpoint, EngineConfig(max_batch=16))

    def progress(factor: float, cell: dict) -> None:
        print(f"x{factor:g}: fixed {cell['fixed']}, broken {cell['broken']} of {cell['n']}", file=sys.stderr, flush=True)

    result = run(engine, feature_spec(preset.steering), Path(args.select), Path(args.data), types=tuple(types),
                 scales=tuple(scales), select_limit=args.select_limit, limit=args.limit, progress=progress)
    result["preset"] = args.preset
    table = markdown(result)
    print(table)
    if args.write and result["chosen"] is not None:
        written = calibrated_preset(preset, result["chosen"], result, args.name or f"{args.preset}-calibrated")
        Path(args.write).write_text(json.dumps(written, indent=1) + "\n")
        result["written"] = written
    if args.json:
        Path(args.json).write_text(json.dumps({"command": sys.argv[1:], **result}, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0


def add_fitted_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--presets", required=True, help="preset file or directory (one written by `preset fit`)")
    p.add_argument("--preset", required=True, help="the preset's name")
    p.add_argument("--data", required=True, help="the held-out split: a `scenes generate` directory or a LLaVA JSONL "
                                                 "file, never the fit's --data or --select")
    p.add_argument("--limit", type=int, help="scenes (images) at most")
    p.add_argument("--types", default=None, help="question types (default: the ones the preset was fitted on)")
    p.add_argument("--rows", default=",".join(FITTED_ROWS), help=f"comma-separated, of {', '.join(FITTED_ROWS)}")
    p.add_argument("--seed", type=int, default=0, help="the random control's first draw")
    p.add_argument("--random-draws", type=int, default=3,
                   help="random controls, each its own draw of features (rows random, random-2, ...)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--markdown", metavar="PATH")
    add_scene_engine_arguments(p)


def fitted_command(args) -> int:
    from sae_weights import FeatureCatalog
    from sae_weights.default import sources_for

    from ..engine import EngineConfig
    from ..fit.examples import load_examples
    from ..presets import feature_spec, table_width
    from ..scenes.commands import scene_engine
    from .fitted import markdown, run

    preset = named_preset(args)
    if isinstance(preset, str):
        return fail(preset)
    fit = preset.fit or {}
    for used in (fit.get("data"), fit.get("select")):
        if used and Path(used).resolve() == Path(args.data).resolve():
            return fail(f"--data: {args.data} is a split the preset was fitted or chosen on; measure on another")
    rows = [r for r in args.rows.split(",") if r]
    if not rows or set(rows) - set(FITTED_ROWS):
        return fail(f"--rows: {args.rows!r}: choose from {', '.join(FITTED_ROWS)}")
    types = tuple(t for t in args.types.split(",") if t) if args.types else tuple(fit.get("types") or ("colour", "shape", "exist"))
    if not Path(args.data).exists():
        return fail(f"--data: {args.data} does not exist")
    if args.random_draws < 1:
        return fail("--random-draws: at least 1")
    root, items = load_examples(args.data, args.limit, types)
    engine = scene_engine(args.model, args.weights, args.sae, args.hookpoint, EngineConfig(
        max_batch=16, max_seq_len=512, max_clamps=table_width({preset.name: preset}, EngineConfig.max_clamps)))
    catalog = FeatureCatalog.load_all(sources_for(args.model, args.sae, args.hookpoint).catalogs)
    pool = [f for f in catalog.ids() if (catalog.get(f).extras.get("max_activation") or 0) > 0] or list(
        range(engine.sae.num_latents))
    density = {f: catalog.get(f).extras.get("density") or 0.0 for f in pool if catalog.get(f) is not None}
    result = run(engine, root, items, feature_spec(preset.steering), pool=pool, diffmean=fit.get("diffmean"),
                 seed=args.seed, rows=rows, random_draws=args.random_draws,
                 density=density if any(density.values()) else None,
                 progress=lambda name, cell: print(f"{name}: fixed {cell['fixed']}, broken {cell['broken']}",
                                                   file=sys.stderr, flush=True))
    result.update({"preset": preset.name, "data": str(args.data), "types": list(types)})
    table = markdown(result)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0
