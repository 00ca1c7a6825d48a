"""``lmm-steer`` command line: one subcommand per job, each a thin layer over a library call."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _sae_info(args) -> int:
    from sae_weights import layouts
    from sae_weights.source import is_builtin, load_sae, resolve_directory

    if is_builtin(args.src):
        sae = load_sae(args.src, hookpoint=args.hookpoint)
        info = {
            "format": "builtin", "d_in": sae.d_in, "num_latents": sae.num_latents, "k": sae.k,
            "activation": sae.cfg.activation, "dtype": "float32", "hookpoint": sae.cfg.hookpoint,
            "bytes": sum(p.numel() * p.element_size() for p in sae.parameters()),
        }
    else:
        directory = resolve_directory(args.src, args.hookpoint, args.revision)
        layout, cfg, _ = layouts.read_config(directory)
        info = {
            "format": layout, "d_in": cfg.d_in, "num_latents": cfg.num_latents, "k": cfg.k,
            "activation": cfg.activation, "dtype": layouts.stored_dtype(directory, layout),
            "hookpoint": args.hookpoint or cfg.hookpoint, "bytes": layouts.tensor_bytes(directory, layout),
            "path": str(directory),
        }
    print(json.dumps(info))
    return 0


def _sae_convert(args) -> int:
    from sae_weights.layouts import save_sae
    from sae_weights.source import load_sae

    sae = load_sae(args.src, hookpoint=args.hookpoint, revision=args.revision)
    out = save_sae(sae, Path(args.dst), args.to, hookpoint=args.hookpoint)
    print(json.dumps({"written": str(out), "format": args.to}))
    return 0


def _serve(args) -> int:
    print("lmm-steer serve: not yet (the HTTP service lands with issue 4)", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmm-steer", description="SAE feature steering for multimodal models")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP server")
    serve.set_defaults(func=_serve)

    sae = sub.add_parser("sae", help="inspect and convert SAE checkpoints").add_subparsers(
        dest="sae_command", required=True
    )
    info = sae.add_parser("info", help="print one JSON object describing an SAE")
    info.add_argument("src", help="local directory, hub repo id, or builtin:random-topk:d_in=N")
    info.add_argument("--hookpoint", help="subfolder, e.g. model.layers.24")
    info.add_argument("--revision")
    info.set_defaults(func=_sae_info)

    convert = sae.add_parser("convert", help="rewrite an SAE in the other layout")
    convert.add_argument("src")
    convert.add_argument("dst")
    convert.add_argument("--to", required=True, choices=["sparsify", "saelens"])
    convert.add_argument("--hookpoint")
    convert.add_argument("--revision")
    convert.set_defaults(func=_sae_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    from sae_weights import CatalogError, SAEFormatError, SAESourceError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SAEFormatError, SAESourceError, CatalogError) as e:
        print(f"lmm-steer: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
