"""TopK SAE training as in the paper (and EleutherAI sparsify): unit-norm decoder rows with the
parallel gradient component removed, b_dec initialised from data, AuxK for dead latents, and
sparsify's default optimiser (sign descent with schedule-free averaging; Adam with warm-up and
cosine decay on request), optional data parallelism over torch.distributed.

Why signum: on a known sparse dictionary (``sae bench-quality``), Adam at sparsify's Adam rate
with warm-up and cosine decay recovered almost none of the true atoms in a short run, where
signum at sparsify's rate recovers them as sparsify does (experiments/sae-training.md).

Checkpoints are the sparsify layout (``serve`` loads them directly) plus the trainer's state in
safetensors and JSON, never pickle; a resumed seeded run continues exactly where it stopped.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from sae_weights import SAEConfig, SparseAutoencoder, save_sae

from .schedule_free import ScheduleFreeSign
from .sparse_ops import SparseDecode, TopKEncode


@dataclass
class TrainConfig:
    num_latents: int
    k: int = 32
    batch_size: int = 4096  # tokens per step, across all ranks
    optimizer: str = "signum"  # or "adam"
    lr: float | None = None  # default: sparsify's rule for the optimiser (see learning_rate)
    warmup_steps: int = 100  # adam only: signum's averaging needs no schedule
    momentum: float = 0.95  # signum: schedule-free interpolation
    steps: int = 1000
    auxk_alpha: float = 1 / 32
    dead_tokens: int = 1_000_000  # a latent silent for this many tokens is dead
    seed: int = 0
    log_every: int = 25
    checkpoint_every: int = 0  # steps; 0: only at the end
    hookpoint: str = "model.layers.0"
    extra: dict = field(default_factory=dict)

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        base = 5e-3 if self.optimizer == "signum" else 2e-4
        return base / math.sqrt(self.num_latents / 2**14)


def warmup_cosine(step: int, base: float, warmup: int, steps: int) -> float:
    """Learning rate at ``step`` (from 0): linear warm-up over ``warmup`` steps, then cosine decay
    to a tenth of ``base`` at ``steps``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def geometric_median(x: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Weiszfeld's algorithm: robust centre of the activations, used to initialise b_dec."""
    m = x.mean(0)
    for _ in range(iters):
        w = 1 / (x - m).norm(dim=1).clamp_min(1e-8)
        m = (w[:, None] * x).sum(0) / w.sum()
    return m


def _unit_rows_step(w: torch.Tensor, g: torch.Tensor, step: Callable[[], None], rows: int = 512) -> None:
    """Keep the decoder rows ``w`` on the unit sphere around an optimiser ``step``: drop the part of
    each gradient row ``g`` along its row, step, renormalise. Slab by slab, so each slab is still in
    cache for its second pass; no [M, D] temporary (2-3x faster on a CPU than whole-matrix ops)."""
    for i in range(0, w.shape[0], rows):
        ws, gs = w[i:i + rows], g[i:i + rows]
        gs.addcmul_(ws, (gs * ws).sum(1, keepdim=True), value=-1)
    step()
    for i in range(0, w.shape[0], rows):
        ws = w[i:i + rows]
        ws /= torch.linalg.vector_norm(ws, dim=1, keepdim=True).clamp_min(1e-8)


def _keep_freed_blocks() -> None:
    """Ask glibc to keep freed [batch, d] blocks for reuse instead of unmapping them: otherwise every
    step's temporaries are fresh mappings whose page faults make each elementwise op 3-5x slower
    on a CPU. (A process-wide setting; nothing changes where glibc is not the allocator.)"""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: its ceiling on 64-bit glibc
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD


class SAETrainer:
    def __init__(self, cfg: TrainConfig, d_in: int, *, device="cpu") -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        gen = torch.Generator().manual_seed(cfg.seed)
        self.sae = SparseAutoencoder(SAEConfig(d_in=d_in, num_latents=cfg.num_latents, activation="topk", k=cfg.k,
                                               hookpoint=cfg.hookpoint))
        with torch.no_grad():
            # sparsify's initialisation: the encoder as torch's Linear default (uniform in +-1/sqrt(d),
            # rows of norm ~1/sqrt(3)), the decoder its unit-norm copy. With sign descent's fixed step
            # the encoder's scale matters: unit-norm encoder rows learned fewer atoms (bench-quality)
            w = (torch.rand(cfg.num_latents, d_in, generator=gen) * 2 - 1) / math.sqrt(d_in)
            self.sae.W_enc.copy_(w)
            self.sae.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        self.sae.to(self.device)
        if self.device.type == "cpu":
            _keep_freed_blocks()
        self.params = [self.sae.W_enc, self.sae.b_enc, self.sae.W_dec, self.sae.b_dec]
        if cfg.optimizer == "signum":
            self.opt = ScheduleFreeSign(self.params, cfg.learning_rate, cfg.momentum)
        elif cfg.optimizer == "adam":
            fused = self.device.type in ("cpu", "cuda")
            self.opt = torch.optim.Adam(self.params, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8, fused=fused)
        else:
            raise ValueError(f"optimizer {cfg.optimizer!r} is not one of signum, adam")
        self.step = 0
        self.tokens_seen = 0
        self.since_fired = torch.zeros(cfg.num_latents, dtype=torch.long, device=self.device)
        self.b_dec_initialised = False
        self.log: list[dict] = []
        self._workspace: torch.Tensor | None = None  # the [batch, latents] pre-activations, reused

    # -- schedule -----------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        base, cfg = self.cfg.learning_rate, self.cfg
        if cfg.optimizer == "signum":
            return base
        return warmup_cosine(step, base, cfg.warmup_steps, cfg.steps)

    # -- one step -----------------------------------------------------------------------------

    def train_step(self, x: torch.Tensor) -> dict:
        """One optimiser step on this rank's ``x`` [tokens, d_in]; ranks average gradients."""
        stats, vals, idx, dead = self.gradients(x)
        self._apply(x.shape[0], vals, idx)
        stats.update({"step": self.step, "dead_share": float(dead.float().mean()), "lr": self.lr_at(self.step - 1),
                      "tokens": self.tokens_seen})
        return stats

    def gradients(self, x: torch.Tensor):
        """Forward and backward on ``x``: every parameter's ``.grad`` holds the gradient of the loss
        (FVU + ``auxk_alpha`` x AuxK FVU), averaged over ranks; nothing is stepped yet."""
        sae, cfg = self.sae, self.cfg
        x = x.to(self.device, torch.float32)
        if not self.b_dec_initialised:
            with torch.no_grad():
                centre = geometric_median(x)
                if self.world > 1:
                    dist.all_reduce(centre)
                    centre /= self.world
                sae.b_dec.copy_(centre)
            self.b_dec_initialised = True
        dead = self.since_fired >= cfg.dead_tokens
        k_aux = min(x.shape[1] // 2, int(dead.sum())) if cfg.auxk_alpha > 0 else 0
        xc = x - sae.b_dec
        # bf16 for the dense encoder matmul on a GPU (the casts are explicit: gradients still
        # accumulate in fp32 buffers)
        enc_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        if self._workspace is None or self._workspace.shape[0] != x.shape[0]:
            self._workspace = torch.empty(x.shape[0], cfg.num_latents, device=self.device, dtype=enc_dtype)
        for p in self.params:  # gradient buffers live across steps; the sparse products write into them
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            elif p is not sae.W_enc and (p is not sae.W_dec or k_aux):  # else overwritten whole
                p.grad.zero_()
        vals, idx, aux_vals, aux_idx, layout = TopKEncode.apply(
            xc.to(enc_dtype), sae.W_enc.detach().to(enc_dtype), sae.b_enc.to(enc_dtype), cfg.k,
            dead if k_aux else None, k_aux, self._workspace, sae.W_enc.grad)
        x_hat = SparseDecode.apply(vals.float(), idx, sae.W_dec, sae.W_dec.grad, layout, not k_aux) + sae.b_dec
        err = x_hat - x
        with torch.no_grad():
            total_var = torch.linalg.vector_norm(x - x.mean(0)).square()
        fvu = err.pow(2).sum() / total_var
        loss = fvu
        aux_fvu = torch.zeros(())
        if k_aux:
            residual = err.detach()
            e_hat = SparseDecode.apply(aux_vals.float(), aux_idx, sae.W_dec, sae.W_dec.grad)
            aux_fvu = (e_hat + residual).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum().clamp_min(1e-12)
            loss = loss + cfg.auxk_alpha * aux_fvu
        loss.backward()
        with torch.no_grad():
            # b_dec also enters the encoder's input (x - b_dec), whose sparse backward returns no input
            # gradient; that path's share of dL/db_dec is -sum_tokens dL/dxc = -(dL/db_enc) W_enc
            sae.b_dec.grad.sub_(sae.b_enc.grad.to(sae.W_enc.dtype) @ sae.W_enc)
        if self.world > 1:
            for p in self.params:
                dist.all_reduce(p.grad)
                p.grad /= self.world
        active = vals > 0
        stats = {"fvu": float(fvu.detach()), "aux_fvu": float(aux_fvu.detach()), "l0": float(active.sum(1).float().mean())}
        if self.world > 1:
            t = torch.tensor([stats["fvu"], stats["l0"]], device=self.device)
            dist.all_reduce(t)
            stats["fvu"], stats["l0"] = (t / self.world).tolist()
        return stats, vals, idx, dead

    @torch.no_grad()
    def _apply(self, batch_tokens: int, vals: torch.Tensor, idx: torch.Tensor) -> None:
        """The optimiser step on the gradients ``gradients`` left, and the firing bookkeeping."""
        sae, cfg = self.sae, self.cfg
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        _unit_rows_step(sae.W_dec, sae.W_dec.grad, self.opt.step)
        fired = torch.bincount(idx[vals > 0], minlength=cfg.num_latents)
        if self.world > 1:
            dist.all_reduce(fired)
        n_tokens = batch_tokens * self.world
        self.since_fired += n_tokens
        self.since_fired[fired > 0] = 0
        self.tokens_seen += n_tokens
        self.step += 1

    # -- checkpoints --------------------------------------------------------------------------

    def save(self, out: Path) -> Path:
        """``out/<hookpoint>/`` in the sparsify layout, plus ``out/trainer_state.*`` (rank 0 writes)."""
        out = Path(out)
        if self.rank != 0:
            return out
        tmp = out.with_name(out.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        save_sae(self.sae.cpu(), tmp / "sae", "sparsify", hookpoint=self.cfg.hookpoint)
        self.sae.to(self.device)
        tensors = {"since_fired": self.since_fired.cpu()}
        for i, st in self.opt.state_dict()["state"].items():
            for name, t in st.items():
                tensors[f"opt.{i}.{name}"] = t.cpu() if torch.is_tensor(t) else torch.tensor(t)
        tensors["rng.torch"] = torch.get_rng_state()
        save_file(tensors, str(tmp / "trainer_state.safetensors"))
        meta = {"step": self.step, "tokens_seen": self.tokens_seen, "b_dec_initialised": self.b_dec_initialised,
                "config": asdict(self.cfg), "log_tail": self.log[-5:]}
        (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=2))
        # the SAE itself sits at out/<hookpoint>/ so `serve --sae out` finds it
        if out.exists():
            shutil.rmtree(out)
        (tmp / "sae" / self.cfg.hookpoint).rename(tmp / self.cfg.hookpoint)
        (tmp / "sae").rmdir()
        os.replace(tmp, out)
        return out

    def load(self, out: Path) -> None:
        from sae_weights import load_directory

        out = Path(out)
        meta = json.loads((out / "trainer_state.json").read_text())
        loaded = load_directory(out / self.cfg.hookpoint)
        with torch.no_grad():
            for p, q in zip(self.params, (loaded.W_enc, loaded.b_enc, loaded.W_dec, loaded.b_dec), strict=True):
                p.copy_(q)
        tensors = load_file(str(out / "trainer_state.safetensors"))
        self.since_fired = tensors["since_fired"].to(self.device)
        state = self.opt.state_dict()
        for key, t in tensors.items():
            if key.startswith("opt."):
                _, i, name = key.split(".", 2)
                state["state"].setdefault(int(i), {})[name] = t.to(self.device)
        self.opt.load_state_dict(state)
        torch.set_rng_state(tensors["rng.torch"])
        self.step, self.tokens_seen = meta["step"], meta["tokens_seen"]
        self.b_dec_initialised = meta["b_dec_initialised"]


def train(trainer: SAETrainer, batches: Callable[[int], torch.Tensor], *, out: Path | None = None,
          log_path: Path | None = None, progress: bool = True, evaluate: Callable | None = None,
          eval_every: int = 0) -> list[dict]:
    """Run ``trainer`` until ``cfg.steps``; ``batches(step)`` gives this rank's batch for a step
    (a pure function of the step, so a resumed run sees exactly the data it would have seen)."""
    cfg = trainer.cfg
    t0 = time.perf_counter()
    while trainer.step < cfg.steps:
        stats = trainer.train_step(batches(trainer.step))
        if evaluate is not None and eval_every and trainer.step % eval_every == 0:
            stats.update(evaluate(trainer.sae))
        stats["elapsed_s"] = round(time.perf_counter() - t0, 2)
        trainer.log.append(stats)
        if trainer.rank == 0 and (trainer.step % cfg.log_every == 0 or trainer.step == cfg.steps):
            if log_path is not None:
                with open(log_path, "a") as f:
                    f.write(json.dumps(stats) + "\n")
            if progress:
                bar = int(30 * trainer.step / cfg.steps)
                print(f"\r[{'#' * bar}{'.' * (30 - bar)}] step {trainer.step}/{cfg.steps} fvu {stats['fvu']:.4f} "
                      f"l0 {stats['l0']:.1f} dead {stats['dead_share']:.3f}", end="", flush=True)
        if out is not None and cfg.checkpoint_every and trainer.step % cfg.checkpoint_every == 0:
            trainer.save(out)
    if progress and trainer.rank == 0:
        print()
    if out is not None:
        trainer.save(out)
    return trainer.log
