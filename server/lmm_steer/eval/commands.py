"""``lmm-steer eval steer``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from sae_weights.default import DEFAULT_CATALOG, DEFAULT_MODEL, DEFAULT_SAE, hookpoint_for

from ..engine.factory import add_device_arguments
from .steer import CONDITIONS, HELD_OUT


def add_steer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concepts", default=str(HELD_OUT),
                   help="concept list (JSON: concepts -> words, prompts); default: the held-out list")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--sae", default=str(DEFAULT_SAE))
    p.add_argument("--hookpoint", default=None)
    p.add_argument("--catalog", default=str(DEFAULT_CATALOG))
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
