"""``lmm-steer sae embed`` (ship a catalog's search-by-meaning index beside it) and
``lmm-steer sae calibrate`` (steering strengths per feature, written into the catalog)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sae_weights.default import TEXT_CATALOG, TEXT_HOOKPOINT, TEXT_MODEL, TEXT_SAE, hookpoint_for

from ..engine.factory import add_device_arguments


def add_embed_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--catalog", action="append", metavar="PATH",
                   help="catalog to index; repeatable, later files add to earlier ones as in serve, and the index "
                        "is written beside the last (default: the text model's shipped catalog)")
    p.add_argument("--embedder", help="sentence-transformers model dir or hub id (default: all-MiniLM-L6-v2)")


def embed_command(args) -> int:
    from sae_weights import FeatureCatalog

    from .embedder import SentenceEmbedder
    from .semantic import SemanticIndex

    paths = args.catalog or [str(TEXT_CATALOG)]
    catalog = FeatureCatalog.load_all(paths)
    index = SemanticIndex(catalog, SentenceEmbedder(args.embedder), paths)
    print(json.dumps({"written": str(index.write_beside(paths[-1])), "features": len(index.ids),
                      "model": index.embedder.name}))
    return 0


def add_calibrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=TEXT_MODEL)
    p.add_argument("--sae", default=str(TEXT_SAE))
    p.add_argument("--hookpoint", default=None, help=f"default: the SAE's own ({TEXT_HOOKPOINT} for the text model)")
    p.add_argument("--catalog", default=str(TEXT_CATALOG), help="catalog with each feature's max_activation")
    p.add_argument("--out", required=True, help="calibrated catalog (JSONL) to write; may be --catalog itself")
    p.add_argument("--features", default="all", help="all, a comma-separated id list, or first-N")
    p.add_argument("--multiples", default="1,2,3,4", help="clamp values tried, as multiples of max_activation")
    p.add_argument("--tokens", type=int, default=12, help="greedy tokens generated per prompt")
    p.add_argument("--batch", type=int, default=64, help="requests decoded together")
    p.add_argument("--max-batch", type=int, default=64)
    add_device_arguments(p)


def _features(spec: str, ids: list[int]) -> list[int]:
    if spec == "all":
        return ids
    if spec.startswith("first-"):
        return ids[: int(spec[len("first-"):])]
    return [int(x) for x in spec.split(",") if x.strip()]


def calibrate_command(args) -> int:
    from sae_weights import FeatureCatalog

    from ..engine import EngineConfig
    from ..engine.factory import build_engine
    from .calibrate import CalibrationConfig, calibrate
    from .embedder import default_embedder
    from .semantic import SemanticIndex

    catalog = FeatureCatalog.load(args.catalog)
    hookpoint = hookpoint_for(args.sae, args.hookpoint)
    cfg = CalibrationConfig(multiples=tuple(float(m) for m in args.multiples.split(",")), tokens=args.tokens,
                            batch=args.batch)
    engine = build_engine(args.model, args.sae, hookpoint=hookpoint, dtype=args.dtype, device=args.device,
                          config=EngineConfig(max_batch=args.max_batch, max_seq_len=256))
    index = SemanticIndex(catalog, default_embedder(), args.catalog)
    features = _features(args.features, catalog.ids())

    def progress(done, total, seconds):
        print(f"\rcalibrate: {done}/{total} generations, {seconds:.0f} s", end="", file=sys.stderr, flush=True)

    records = calibrate(engine, catalog, index, features, cfg, progress)
    print(file=sys.stderr)
    rows = []
    for fid in catalog.ids():
        row = catalog.get(fid).to_dict()
        if fid in records:
            row["steer"] = records[fid]
        rows.append(json.dumps(row))
    Path(args.out).write_text("\n".join(rows) + "\n")
    usable = sum(1 for r in records.values() if r["value"] is not None)
    print(json.dumps({"written": args.out, "calibrated": len(records), "with_value": usable}))
    return 0
