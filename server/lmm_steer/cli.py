"""``lmm-steer`` command line: one subcommand per job, each a thin layer over a library call."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sae_weights.default import DEFAULT_MODEL, sources_for

from .engine.factory import add_decode_arguments, add_device_arguments, add_hub_timeout_argument


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
        directory = resolve_directory(args.src, args.hookpoint, args.revision, timeout_s=args.hub_timeout)
        layout, cfg, dtype = layouts.check_directory(directory)  # what the loader checks, tensors included
        info = {
            "format": layout, "d_in": cfg.d_in, "num_latents": cfg.num_latents, "k": cfg.k,
            "activation": cfg.activation, "dtype": dtype,
            "hookpoint": args.hookpoint or cfg.hookpoint, "bytes": layouts.tensor_bytes(directory, layout),
            "path": str(directory),
        }
    print(json.dumps(info))
    return 0


def _sae_convert(args) -> int:
    from sae_weights.layouts import check_hookpoint_name, save_sae
    from sae_weights.source import load_sae

    # --hookpoint names what is written under dst (sparsify's subfolder, SAELens's hook name): refused
    # as that, before the source is read
    check_hookpoint_name(args.hookpoint, Path(args.dst), args.to)
    sae = load_sae(args.src, hookpoint=args.hookpoint, revision=args.revision, timeout_s=args.hub_timeout)
    out = save_sae(sae, Path(args.dst), args.to, hookpoint=args.hookpoint)
    print(json.dumps({"written": str(out), "format": args.to}))
    return 0


def _sae_bundle(args) -> int:
    from sae_weights.catalog import bundle_catalog

    print(json.dumps(bundle_catalog(args.catalog, args.out, explained_only=args.explained_only)))
    return 0


def parse_clamp(text: str):
    """``ID=VALUE[:MODE][@WHERE]``, or ``ID=VALUE:transfer:SOURCE[@WHERE]`` -> FeatureEdit (``@WHERE``:
    the edit acts only where feature WHERE fires)."""
    from .engine.steering import MODES, FeatureEdit

    head, at, where = text.partition("@")
    fid, sep, rest = head.partition("=")
    value, _, mode = rest.partition(":")
    mode, _, source = mode.partition(":")
    try:
        if not sep or bool(source) != (mode == "transfer") or (at and not where):
            raise ValueError
        return FeatureEdit(int(fid), float(value), mode or "clamp", int(source) if source else None,
                           int(where) if at else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad clamp {text!r}: expected ID=VALUE[:MODE][@WHERE] (MODE in {MODES}) "
                                         "or ID=VALUE:transfer:SOURCE[@WHERE]") from None


def _generate(args) -> int:
    from PIL import Image

    from .engine import EngineConfig, EngineError, GenerationRequest, SamplingParams, SteeringSpec
    from .engine.factory import build_engine

    sources = sources_for(args.model, args.sae, args.hookpoint)
    engine = build_engine(
        args.model, sources.sae, hookpoint=sources.hookpoint, dtype=args.dtype, device=args.device, hub_timeout=args.hub_timeout,
        config=EngineConfig(max_batch=1, cuda_graphs=not args.no_cuda_graphs, compile=args.compile,
                            max_seq_len=args.max_seq_len),
    )
    images = []
    for path in args.image:
        try:
            images.append(Image.open(path).convert("RGB"))
        except OSError as e:
            print(f"lmm-steer: error: --image {path}: {e}", file=sys.stderr)
            return 1
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": args.prompt}]
    steering = None
    if args.clamp or args.semantics != "delta" or args.scope:
        steering = SteeringSpec(edits=list(args.clamp), scope=args.scope, semantics=args.semantics)
    req = GenerationRequest(
        messages=[{"role": "user", "content": content}], images=images, steering=steering,
        sampling=SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed),
    )
    try:
        result = engine.generate([req])[0]
    except EngineError as e:
        print(f"lmm-steer: error: {e.field}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason}))
    else:
        print(result.text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmm-steer", description="SAE feature steering for multimodal models")
    sub = parser.add_subparsers(dest="command", required=True)

    from . import serve as serve_module

    serve = sub.add_parser("serve", help="run the HTTP server (default: an offline builtin model)")
    serve_module.add_arguments(serve)
    serve.set_defaults(func=serve_module.main)

    gen = sub.add_parser("generate", help="one steered generation, for scripts and debugging")
    gen.add_argument("--model", default=DEFAULT_MODEL)
    gen.add_argument("--sae", default=None, help="SAE source, or 'none' (default: the model's shipped SAE, for the default and the scenes model)")
    gen.add_argument("--hookpoint", help="model.layers.<i> (default: the SAE's own, else 3/4 of the depth)")
    add_hub_timeout_argument(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--image", action="append", default=[], metavar="PATH")
    gen.add_argument("--clamp", action="append", default=[], type=parse_clamp, metavar="ID=VALUE[:MODE][@WHERE]",
                     help="an edit of one SAE feature (repeatable); ID=VALUE:transfer:SOURCE writes VALUE times "
                          "feature SOURCE's activation along ID's direction, where SOURCE fires; @WHERE gates an "
                          "edit: it acts only where feature WHERE fires")
    gen.add_argument("--scope", choices=["all", "prompt", "generated", "image"])
    gen.add_argument("--semantics", choices=["delta", "paper"], default="delta")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int)
    add_device_arguments(gen)
    gen.add_argument("--max-seq-len", type=int, default=4096)
    add_decode_arguments(gen)
    gen.add_argument("--json", action="store_true")
    gen.set_defaults(func=_generate)

    from . import bench

    bench_parser = sub.add_parser("bench", help="decode throughput and latency against same-run baselines; "
                                                 "bench soak: a server's long-run behaviour")
    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(func=bench.main)
    from . import soak

    soak_parser = bench_parser.add_subparsers(dest="bench_command", metavar="{soak}").add_parser(
        "soak", help="a server under mixed traffic for N minutes: requests, errors, latency, memory",
        description=soak.DESCRIPTION)
    soak.add_arguments(soak_parser)
    soak_parser.set_defaults(func=soak.main)

    sae = sub.add_parser("sae", help="inspect and convert SAE checkpoints").add_subparsers(
        dest="sae_command", required=True
    )
    info = sae.add_parser("info", help="print one JSON object describing an SAE")
    info.add_argument("src", help="local directory, hub repo id, or builtin:random-topk:d_in=N")
    info.add_argument("--hookpoint", help="subfolder, e.g. model.layers.24")
    info.add_argument("--revision")
    add_hub_timeout_argument(info)
    info.set_defaults(func=_sae_info)

    from .concepts import commands as concepts
    from .effects import commands as effects
    from .explain import commands as explain
    from .training import bench as train_bench
    from .training import commands as training
    from .training import quality as train_quality

    for name, help_text, add_arguments, func in [
        ("train", "train a TopK SAE on a model's activations at a hookpoint", training.add_train_arguments,
         training.train_command),
        ("catalog", "record each feature's top contexts, density and maximum", training.add_catalog_arguments,
         training.catalog_command),
        ("explain", "explain features from their highlighted top images (or marked contexts) with an LMM endpoint",
         explain.add_explain_arguments, explain.explain_command),
        ("score", "score explanations: IoU against annotated objects and CLIP score, beside random baselines",
         explain.add_score_arguments, explain.score_command),
        ("highlights", "add feature-style highlighted examples with their answers to a scenes split (to train an explainer)",
         explain.add_highlights_arguments, explain.highlights_command),
        ("embed", "index a catalog for search by meaning and write the index beside it", concepts.add_embed_arguments,
         concepts.embed_command),
        ("calibrate", "measure each feature's steering strengths into the catalog", concepts.add_calibrate_arguments,
         concepts.calibrate_command),
        ("effects", "measure what clamping features on the image makes a scenes model answer, into catalog rows",
         effects.add_effects_arguments, effects.effects_command),
        ("conditions", "give effect rows the condition of their question type: a feature firing on such prompts "
                       "alone", effects.add_conditions_arguments, effects.conditions_command),
        ("bench-train", "training step rate against the dense encoder matmul alone", train_bench.add_arguments,
         train_bench.main),
        ("bench-quality", "recovery of a known sparse dictionary, against sparsify for equal tokens",
         train_quality.add_arguments, train_quality.main),
    ]:
        command = sae.add_parser(name, help=help_text)
        add_arguments(command)
        command.set_defaults(func=func)

    convert = sae.add_parser("convert", help="rewrite an SAE in the other layout")
    convert.add_argument("src")
    convert.add_argument("dst")
    convert.add_argument("--to", required=True, choices=["sparsify", "saelens"])
    convert.add_argument("--hookpoint")
    convert.add_argument("--revision")
    add_hub_timeout_argument(convert)
    convert.set_defaults(func=_sae_convert)
    bundle = sae.add_parser("bundle", help="copy a catalog with the top images it names, which it then names relative to itself")
    bundle.add_argument("catalog", help="catalog JSONL")
    bundle.add_argument("out", help="directory to write the catalog and its images/ into")
    bundle.add_argument("--explained-only", action="store_true",
                        help="an `sae explain` output: keep the explained features alone, with their explanation, "
                             "scores and evidence images but not the run's statistics, to merge over a catalog")
    bundle.set_defaults(func=_sae_bundle)
    from .eval import commands as evaluations

    evals = sub.add_parser("eval", help="evaluations on fixed sets, with same-run baselines").add_subparsers(
        dest="eval_command", required=True)
    steer = evals.add_parser("steer", help="concept steering against unsteered, prompting and the README's recipe")
    evaluations.add_steer_arguments(steer)
    steer.set_defaults(func=evaluations.steer_command)
    fix = evals.add_parser("fix", help="do clamps fix a scenes model's misrecognitions? against random and oracle features")
    evaluations.add_fix_arguments(fix)
    fix.set_defaults(func=evaluations.fix_command)
    preset_eval = evals.add_parser("preset", help="choose a steering preset's strength on held-out questions, measure it on others")
    evaluations.add_preset_arguments(preset_eval)
    preset_eval.set_defaults(func=evaluations.preset_command)
    fitted = evals.add_parser("fitted", help="a fitted preset on held-out questions beside random, prompting and "
                                             "difference-of-means controls")
    evaluations.add_fitted_arguments(fitted)
    fitted.set_defaults(func=evaluations.fitted_command)
    from .fit import commands as fitting

    presets = sub.add_parser("preset", help="steering presets fitted from labelled examples").add_subparsers(
        dest="preset_command", required=True)
    fit = presets.add_parser("fit", help="fit a preset that makes the model right more often, chosen on a selection split")
    fitting.add_fit_arguments(fit)
    fit.set_defaults(func=fitting.fit_command)
    from .scenes import commands as scenes

    scene_commands = sub.add_parser("scenes", help="synthetic scenes with exact ground truth").add_subparsers(
        dest="scenes_command", required=True)
    generate = scene_commands.add_parser("generate", help="scenes, COCO masks, captions, questions and regions")
    scenes.add_generate_arguments(generate)
    generate.set_defaults(func=scenes.generate_command)
    train = scene_commands.add_parser("train", help="the scenes LMM from scratch (resumable)")
    scenes.add_train_arguments(train)
    train.set_defaults(func=scenes.train_command)
    evaluate = scene_commands.add_parser("eval", help="the scenes LMM's accuracy by question type and difficulty")
    scenes.add_eval_arguments(evaluate)
    evaluate.set_defaults(func=scenes.eval_command)
    export = scene_commands.add_parser("export", help="the scenes LMM as a plain LLaVA-NeXT checkpoint directory")
    scenes.add_export_arguments(export)
    export.set_defaults(func=scenes.export_command)
    localise = scene_commands.add_parser(
        "localise", help="do an SAE's features fire on the objects they are about? patch IoU against the masks")
    scenes.add_localise_arguments(localise)
    localise.set_defaults(func=scenes.localise_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    from sae_weights import CatalogError, SAEFormatError, SAESourceError

    from .engine.hookpoint import HookpointError
    from .models.loader import ModelLoadError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SAEFormatError, SAESourceError, CatalogError, HookpointError, ModelLoadError) as e:
        print(f"lmm-steer: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
