"""``lmm-steer scenes generate``, ``train``, ``eval``, ``export`` and ``localise``."""

from __future__ import annotations

import argparse
import json


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="directory to write (created)")
    p.add_argument("--n", type=int, required=True, help="scenes")
    p.add_argument("--seed", type=int, required=True, help="a test split takes a seed no training split used")
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--regions", type=int, default=1, help="highlighted-region examples per scene")


def generate_command(args) -> int:
    from pathlib import Path

    from .generate import generate

    for flag, value, least in (("--n", args.n, 1), ("--size", args.size, 32), ("--regions", args.regions, 0)):
        if value < least:
            raise SystemExit(f"lmm-steer: error: {flag} must be at least {least}, got {value}")
    print(json.dumps(generate(Path(args.out), args.n, args.seed, args.size, args.regions)))
    return 0


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    from dataclasses import fields

    from .train import PRECISIONS, SceneTrainConfig

    p.add_argument("--data", required=True, help="a `scenes generate` directory (the training split)")
    p.add_argument("--out", required=True,
                   help="run directory: checkpoint, log, CLIP model and the trained weights; an existing one resumes")
    for f in fields(SceneTrainConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                       choices=PRECISIONS if f.name == "precision" else None, help=f"default {f.default}")


def train_command(args) -> int:
    from dataclasses import fields
    from pathlib import Path

    from .train import TRAINED_FILE, SceneTrainConfig, print_progress, train_scenes_lmm

    cfg = SceneTrainConfig(**{f.name: getattr(args, f.name) for f in fields(SceneTrainConfig)})
    for name in ("steps", "batch", "turns", "rank", "checkpoint_every", "clip_batch"):
        if getattr(cfg, name) < 1:
            raise SystemExit(f"lmm-steer: error: --{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if not (Path(args.data) / "conversations.jsonl").exists():
        raise SystemExit(f"lmm-steer: error: --data {args.data}: no conversations.jsonl (make it with `scenes generate`)")
    if cfg.init and not Path(cfg.init).is_file():
        raise SystemExit(f"lmm-steer: error: --init {cfg.init}: no such file (a `scenes train` run's {TRAINED_FILE})")
    for name in ("region_share", "highlight_share"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise SystemExit(f"lmm-steer: error: --{name.replace('_', '-')} must be within [0, 1], got {getattr(cfg, name)}")
    if cfg.binding_turns < 0:
        raise SystemExit(f"lmm-steer: error: --binding-turns must be at least 0, got {cfg.binding_turns}")
    if cfg.budget_minutes < 0:
        raise SystemExit(f"lmm-steer: error: --budget-minutes must be at least 0 (0: no budget), got {cfg.budget_minutes}")
    if max(cfg.lr, cfg.lora_lr, cfg.vision_lr) <= 0:
        raise SystemExit("lmm-steer: error: --lr, --lora-lr and --vision-lr are all 0: nothing to train")
    print(json.dumps(train_scenes_lmm(Path(args.data), Path(args.out), cfg, print_progress)))
    return 0


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="a `scenes generate` directory made with a seed training never used")
    p.add_argument("--model", default="builtin:scenes-llava-next", help="model name or path")
    p.add_argument("--weights", help="a `scenes train` run's scenes-llava-next.safetensors instead of the shipped one")
    p.add_argument("--limit", type=int, help="the first N scenes only")
    p.add_argument("--batch", type=int, default=16, help="questions per generate call")
    p.add_argument("--json", help="write the result, every answer included, here")
    p.add_argument("--markdown", help="write the accuracy table here")


def eval_command(args) -> int:
    import sys
    from pathlib import Path

    from .evaluate import evaluate, markdown

    data = Path(args.data)
    if not (data / "conversations.jsonl").exists():
        raise SystemExit(f"lmm-steer: error: --data {args.data}: no conversations.jsonl (make it with `scenes generate`)")
    for flag, value in (("--limit", args.limit), ("--batch", args.batch)):
        if value is not None and value < 1:
            raise SystemExit(f"lmm-steer: error: {flag} must be at least 1, got {value}")
    loaded = _load(args.model, args.weights)
    if not loaded.is_multimodal:
        raise SystemExit(f"lmm-steer: error: --model {args.model} takes no images")
    result = evaluate(loaded, data, args.limit, args.batch,
                      progress=lambda done, n: print(f"{done}/{n}", file=sys.stderr, flush=True))
    table = markdown(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(table)
    print(table)
    print(json.dumps({"questions": result["questions"], "floors": result["floors"]}))
    return 0


def _load(model: str, weights: str | None):
    from pathlib import Path

    from ..models.loader import ModelLoadError, load_model
    from ..models.scenes_llava_next import NAME, ScenesWeightsMissing, load_scenes_llava_next

    if weights is None:
        try:
            return load_model(model)
        except ModelLoadError as e:
            raise SystemExit(f"lmm-steer: error: --model: {e}") from None
    if model != NAME:
        raise SystemExit(f"lmm-steer: error: --weights applies to {NAME} only, not --model {model}")
    try:
        return load_scenes_llava_next(weights=Path(weights))
    except ScenesWeightsMissing:
        raise SystemExit(f"lmm-steer: error: --weights {weights}: no such file") from None


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="directory to write (save_pretrained layout)")
    p.add_argument("--weights", help="a `scenes train` run's scenes-llava-next.safetensors instead of the shipped one")


def export_command(args) -> int:
    from pathlib import Path

    from ..models.scenes_llava_next import NAME, export

    out = export(_load(NAME, args.weights), Path(args.out))
    print(json.dumps({"out": str(out), "files": sorted(p.name for p in out.iterdir())}))
    return 0


def add_scene_engine_arguments(p: argparse.ArgumentParser) -> None:
    """What `scene_engine` is built from: the model, a run's weights, the SAE and its hookpoint."""
    p.add_argument("--model", default="builtin:scenes-llava-next", help="a multimodal model name or path")
    p.add_argument("--weights", help="a `scenes train` run's scenes-llava-next.safetensors instead of the shipped one")
    p.add_argument("--sae", help="SAE source (default: the model's shipped SAE)")
    p.add_argument("--hookpoint", help="default: the SAE's own")


def scene_engine(model: str, weights: str | None, sae: str | None, hookpoint: str | None, config=None):
    """A steering engine on a multimodal model (``weights``: a scenes run's instead of the shipped
    ones) with the SAE named, else the model's shipped one."""
    from sae_weights.default import sources_for

    from ..engine.factory import engine_for

    sources = sources_for(model, sae, hookpoint)
    if sources.sae == "none":
        raise SystemExit(f"lmm-steer: error: --sae: {model} has no shipped SAE here; name one")
    loaded = _load(model, weights)
    if not loaded.is_multimodal:
        raise SystemExit(f"lmm-steer: error: --model {model} takes no images")
    return engine_for(loaded, sources.sae, hookpoint=sources.hookpoint, config=config)


def add_localise_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--select", required=True, help="a `scenes generate` directory: choose each value's best feature here")
    p.add_argument("--test", required=True, help="another one (another seed): measure the chosen features' IoU here")
    add_scene_engine_arguments(p)
    p.add_argument("--scenes", type=int, default=100, help="scenes of each split")
    p.add_argument("--seed", type=int, default=0, help="draws the random-feature baseline")
    p.add_argument("--json", help="write the result here")


def localise_command(args) -> int:
    from pathlib import Path

    from .localise import localise, markdown

    for flag in ("select", "test"):
        if not (Path(getattr(args, flag)) / "annotations.json").exists():
            raise SystemExit(f"lmm-steer: error: --{flag} {getattr(args, flag)}: no annotations.json "
                             "(make it with `scenes generate`)")
    if args.scenes < 1:
        raise SystemExit(f"lmm-steer: error: --scenes must be at least 1, got {args.scenes}")
    engine = scene_engine(args.model, args.weights, args.sae, args.hookpoint)
    result = localise(engine, Path(args.select), Path(args.test), args.scenes, args.seed)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(markdown(result))
    return 0
