"""``lmm-steer sae explain``."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path


def add_explain_arguments(p: argparse.ArgumentParser) -> None:
    from ..engine.factory import add_device_arguments

    p.add_argument("--model", required=True, help="the model whose SAE features are explained")
    p.add_argument("--sae", required=True)
    p.add_argument("--hookpoint")
    p.add_argument("--data", required=True, help="examples (as `sae train` reads them): their images, or else texts")
    p.add_argument("--examples", type=int, default=2000, help="examples read from --data")
    p.add_argument("--explainer", required=True, metavar="URL", help="OpenAI-compatible endpoint (…/v1)")
    p.add_argument("--explainer-model", required=True, metavar="NAME")
    p.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the endpoint's API key")
    p.add_argument("--features", default="all", help="all, top-N (strongest first), sample-N (drawn at random, seed 0) or comma-separated ids")
    p.add_argument("--top", type=int, default=5, help="top images (or contexts) shown per feature")
    p.add_argument("--mode", choices=("together", "per-image"), default="together",
                   help="one request with all top images (the paper), or one per image with the answers combined "
                        "(small explainers)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--retries", type=int, default=4, help="retries of a timed-out or refused request, with backoff")
    p.add_argument("--out", required=True, help="catalog JSONL written (an existing one resumes)")
    add_device_arguments(p)


def explain_command(args) -> int:
    from tqdm import tqdm

    from ..engine.factory import build_engine
    from ..training.catalog_builder import build_catalog
    from ..training.data import iter_examples
    from .explainer import Explainer, ExplainerConfig
    from .run import explain_all, parse_features
    from .top_images import peak_patch, top_images

    def fail(message: str) -> int:
        print(f"lmm-steer: error: {message}", file=sys.stderr)
        return 2

    for flag, value in (("--examples", args.examples), ("--top", args.top), ("--concurrency", args.concurrency)):
        if value < 1:
            return fail(f"{flag} must be at least 1, got {value}")
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            return fail(f"--api-key-env: {args.api_key_env} is not set")
    started = time.monotonic()
    engine = build_engine(args.model, args.sae, hookpoint=args.hookpoint, dtype=args.dtype, device=args.device)
    examples = list(itertools.islice(iter_examples(args.data), args.examples))
    paths = list(dict.fromkeys(ex.images[0] for ex in examples if ex.images))
    rows: dict[int, dict] = {}
    if paths and engine.loaded.is_multimodal:
        bar = tqdm(total=len(paths), desc="top images", file=sys.stderr)
        for f, images in top_images(engine, paths, args.top, progress=lambda stage, i, n: bar.update(1)
                                    if stage == "rank" else None).items():
            # max_activation as everywhere else: a peak at one position (here the largest patch of the
            # top images), not the mean over an image that ranks them; steering values scale with it
            rows[f] = {"feature": f, "explanation": "", "max_activation": peak_patch(images),
                       "top_images": [{"image": im["image"], "activation": im["score"], "grid": im["grid"]}
                                      for im in images]}
        bar.close()
    texts = [ex for ex in examples if not ex.images]
    if texts:
        for row in build_catalog(engine, texts, top=args.top):
            if row["top_contexts"] and row["feature"] not in rows:
                rows[row["feature"]] = row
    if not rows:
        return fail(f"--data {args.data}: no feature fires on its examples")
    try:
        features = parse_features(args.features, rows)
    except ValueError as e:
        return fail(str(e))
    explainer = Explainer(ExplainerConfig(args.explainer, args.explainer_model, api_key, timeout_s=args.timeout,
                                          retries=args.retries))
    bar = tqdm(total=len(features), desc="explained", file=sys.stderr)
    try:
        summary = explain_all(explainer, rows, features, Path(args.out), per_image=args.mode == "per-image",
                              concurrency=args.concurrency, progress=lambda done, n: bar.update(1))
    finally:
        bar.close()
        explainer.close()
    summary["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(summary))
    return 0 if summary["failed"] == 0 else 1


def add_highlights_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="a `scenes generate` directory; highlights/ and highlights.jsonl are added")
    p.add_argument("--per-scene", type=int, default=1, help="highlighted examples per scene")


def highlights_command(args) -> int:
    from pathlib import Path

    from .highlight_examples import write_highlights

    if not (Path(args.data) / "scenes.json").exists():
        raise SystemExit(f"lmm-steer: error: --data {args.data}: no scenes.json (make it with `scenes generate`)")
    if args.per_scene < 1:
        raise SystemExit(f"lmm-steer: error: --per-scene must be at least 1, got {args.per_scene}")
    print(json.dumps(write_highlights(Path(args.data), args.per_scene)))
    return 0


def add_score_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--catalog", required=True, help="an explained catalog (`sae explain --out`)")
    p.add_argument("--data", required=True, help="the images' directory (a `scenes generate` split, or COCO images)")
    p.add_argument("--annotations", help="COCO-format annotations (default: DATA/annotations.json)")
    p.add_argument("--grounder", choices=("annotations", "groundingdino-sam"), default="annotations",
                   help="what grounds an explanation in an image: the annotated objects it names, or Grounding DINO's "
                        "boxes for it segmented by SAM (from a hub; annotations, where present, still give the "
                        "ceiling and the ground-truth attribute)")
    p.add_argument("--dino", default="IDEA-Research/grounding-dino-tiny", help="Grounding DINO model (hub id or path)")
    p.add_argument("--sam", default="facebook/sam-vit-base", help="SAM model (hub id or path)")
    p.add_argument("--clip", metavar="MODEL", help="CLIP model for CLIP score: builtin:scenes-clip (the scenes "
                                                   "model's, shipped), a `scenes train` run's clip/ directory or any "
                                                   "transformers CLIP model")
    p.add_argument("--seed", type=int, default=0, help="draws the random-feature and shuffled baselines")
    p.add_argument("--out", help="catalog written with per-feature scores (default: --catalog, in place)")
    p.add_argument("--json", metavar="PATH", help="the report, every feature's scores included")
    p.add_argument("--markdown", metavar="PATH")


def score_command(args) -> int:
    from .run import read_rows, write_rows
    from .score import ClipScorer, load_annotations, markdown, score

    catalog, data = Path(args.catalog), Path(args.data)
    annotations = Path(args.annotations) if args.annotations else data / "annotations.json"
    needed = [("--catalog", catalog)]
    if args.grounder == "annotations" or args.annotations:
        needed.append(("--annotations" if args.annotations else "--data", annotations))
    for flag, path in needed:
        if not path.exists():
            print(f"lmm-steer: error: {flag}: {path} does not exist", file=sys.stderr)
            return 2
    ann = load_annotations(annotations, data) if annotations.exists() else None
    grounder = None
    if args.grounder == "groundingdino-sam":
        from .grounders import DinoSamGrounder

        grounder = DinoSamGrounder(args.dino, args.sam)
    rows = read_rows(catalog)
    result = score(list(rows.values()), ann, ClipScorer(args.clip) if args.clip else None, seed=args.seed,
                   grounder=grounder)
    if not result["features"]:
        print(f"lmm-steer: error: --catalog {catalog}: no explained feature with top images", file=sys.stderr)
        return 2
    write_rows(Path(args.out) if args.out else catalog, rows)
    result["command"] = sys.argv[1:]
    table = markdown(result)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0
