"""``lmm-steer sae train`` and ``lmm-steer sae catalog``."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist

from ..engine.factory import add_device_arguments


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True)
    p.add_argument("--hookpoint", required=True, help="model.layers.<i>")
    p.add_argument("--data", required=True, help="image folder, LLaVA .jsonl, text file(s), wordnet:<dir>, hf:<name>")
    p.add_argument("--tokens", type=int, default=1_000_000, help="activations to collect (across ranks)")
    width = p.add_mutually_exclusive_group()
    width.add_argument("--latents", type=int)
    width.add_argument("--expansion", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096, help="tokens per step, across ranks")
    p.add_argument("--steps", type=int, help="default: one pass over the collected tokens")
    p.add_argument("--optimizer", choices=["signum", "adam"], default="signum",
                   help="signum: sign descent with schedule-free averaging (sparsify's default); adam: with warm-up "
                        "and cosine decay")
    p.add_argument("--lr", type=float, help="default: 5e-3 (signum) or 2e-4 (adam) / sqrt(latents / 2^14), as sparsify")
    p.add_argument("--warmup", type=int, default=100, help="adam's warm-up steps")
    p.add_argument("--auxk-alpha", type=float, default=1 / 32)
    p.add_argument("--dead-tokens", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="sae-out")
    p.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--cache-activations", metavar="DIR", help="reuse (or write) activation shards here")
    p.add_argument("--max-len", type=int, default=256, help="tokens per text example")
    p.add_argument("--eval-every", type=int, default=0, help="steps between held-out loss/KL evaluations")
    p.add_argument("--eval-examples", type=int, default=32)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--wandb", metavar="PROJECT", help="also log to Weights & Biases (when installed)")
    add_device_arguments(p)
    p.add_argument("--quiet", action="store_true")


def _launch_ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) as a launcher such as torchrun sets them; (0, 1, 0) alone."""
    env = os.environ
    return int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0"))


def _join_process_group(world: int) -> None:
    """Joins the launcher's process group. Called only after the model is loaded: importing
    ``torch.distributed.checkpoint`` (transformers does, on its first model) while a group exists
    keeps that group alive past ``destroy_process_group``, and its gloo worker threads then meet
    interpreter shutdown and abort the process (SIGABRT, 1 run in ~10)."""
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def train_command(args) -> int:
    from ..engine.factory import pick_device, pick_dtype
    from ..engine.hookpoint import language_model, resolve_layer_index
    from ..models.loader import load_model
    from .activations import collect, splice_eval
    from .data import iter_examples
    from .trainer import SAETrainer, TrainConfig, train

    rank, world, local_rank = _launch_ranks()
    device = pick_device(args.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)  # NCCL's barrier and communicators use the current device
    loaded = load_model(args.model, dtype=pick_dtype(args.dtype, device), device=device)
    _join_process_group(world)
    hook_index = resolve_layer_index(loaded.model, args.hookpoint)
    d_in = language_model(loaded.model).config.hidden_size
    examples = iter_examples(args.data)
    held_out = list(itertools.islice(examples, args.eval_examples)) if args.eval_every else []
    mine = (ex for i, ex in enumerate(examples) if i % world == rank)  # each rank its own shard
    cache = Path(args.cache_activations) / f"rank{rank}" if args.cache_activations else None
    key = {"model": args.model, "hookpoint": args.hookpoint, "data": args.data, "max_len": args.max_len,
           "rank": rank, "world": world}
    acts = collect(loaded, hook_index, mine, args.tokens // world, max_len=args.max_len, cache_dir=cache, cache_key=key)
    if acts.shape[0] < args.batch // world:
        raise SystemExit(f"lmm-steer: error: --data {args.data} gave only {acts.shape[0]} tokens")
    latents = args.latents or d_in * args.expansion
    steps = args.steps or max(1, math.ceil(acts.shape[0] * world / args.batch))
    cfg = TrainConfig(num_latents=latents, k=args.k, batch_size=args.batch, optimizer=args.optimizer, lr=args.lr, warmup_steps=args.warmup,
                      steps=steps, auxk_alpha=args.auxk_alpha, dead_tokens=args.dead_tokens, seed=args.seed,
                      log_every=args.log_every, checkpoint_every=args.checkpoint_every, hookpoint=args.hookpoint)
    trainer = SAETrainer(cfg, d_in, device=device)
    out = Path(args.out)
    if args.resume and (out / "trainer_state.json").exists():
        trainer.load(out)
    per_rank = args.batch // world

    def batches(step: int) -> torch.Tensor:
        epoch, offset = divmod(step * per_rank, acts.shape[0])
        order = torch.randperm(acts.shape[0], generator=torch.Generator().manual_seed(args.seed * 7919 + epoch))
        rows = order[offset : offset + per_rank]
        if rows.numel() < per_rank:  # wrap into the next epoch's order
            nxt = torch.randperm(acts.shape[0], generator=torch.Generator().manual_seed(args.seed * 7919 + epoch + 1))
            rows = torch.cat([rows, nxt[: per_rank - rows.numel()]])
        return acts[rows].float()

    evaluate = None
    if held_out:
        def evaluate(sae):
            return splice_eval(loaded, hook_index, sae, held_out)

    wandb_run = None
    if args.wandb and rank == 0:
        try:
            import wandb

            wandb_run = wandb.init(project=args.wandb, config=vars(args))
        except ImportError:
            print("lmm-steer: wandb is not installed; logging to JSONL only")
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_name(out.name + ".log.jsonl")
    log = train(trainer, batches, out=out, log_path=log_path, progress=not args.quiet, evaluate=evaluate,
                eval_every=args.eval_every)
    if wandb_run is not None:
        for row in log:
            wandb_run.log(row, step=row["step"])
        wandb_run.finish()
    digests = [_digest(trainer.sae)]
    if world > 1:  # every rank must end with the same weights
        digests = [None] * world
        dist.all_gather_object(digests, _digest(trainer.sae))
    if rank == 0:
        summary = {"out": str(out), "steps": trainer.step, "tokens": trainer.tokens_seen, "world_size": world,
                   "rank_digests": digests, **{k: log[-1][k] for k in ("fvu", "l0", "dead_share") if log}}
        if held_out:
            summary.update(splice_eval(loaded, hook_index, trainer.sae, held_out))
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


def _digest(sae) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec):
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def add_catalog_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True)
    p.add_argument("--sae", required=True)
    p.add_argument("--hookpoint")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="catalog JSONL to write")
    p.add_argument("--examples", type=int, default=2000)
    p.add_argument("--top", type=int, default=8, help="contexts kept per feature")
    p.add_argument("--window", type=int, default=12, help="tokens of context before the activating token")
    p.add_argument("--max-len", type=int, default=128)
    add_device_arguments(p)


def catalog_command(args) -> int:
    from ..engine.factory import build_engine
    from .catalog_builder import build_catalog
    from .data import iter_examples

    engine = build_engine(args.model, args.sae, hookpoint=args.hookpoint, dtype=args.dtype, device=args.device)
    examples = list(itertools.islice(iter_examples(args.data), args.examples))
    rows = build_catalog(engine, examples, top=args.top, window=args.window, max_len=args.max_len)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, out)
    live = sum(1 for r in rows if r["density"] > 0)
    print(json.dumps({"out": str(out), "features": len(rows), "features_seen_active": live,
                      "examples": len(examples)}))
    return 0
