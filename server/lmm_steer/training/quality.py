"""``lmm-steer sae bench-quality``: does the trainer learn the true features, for equal tokens?

Activations are drawn from a known sparse dictionary (random unit atoms, a few active per token
with Zipf-like frequencies and exponential magnitudes, a fixed offset and some noise, scaled to
unit mean square per dimension), so what a trainer learned can be checked against the truth:

* FVU and L0 on held-out tokens; dead share: latents that never fire on them;
* atom recovery: per true atom, the largest cosine with any decoder row (mean, and the share
  above 0.9); precision: per live latent, the largest cosine with any true atom (mean).

Our trainer and, when installed (``pip install -e '.[bench]'``), EleutherAI sparsify with its own
defaults train on the same token stream in the same run; step times are medians of the run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from sae_weights import SAEConfig, SparseAutoencoder

from .trainer import SAETrainer, TrainConfig

HELD_OUT_SEED = 10**6  # held-out batches come from this offset of the stream's step seeds


@dataclass
class DictionaryStream:
    d: int = 256
    atoms: int = 4096
    active: int = 16
    zipf: float = 1.0  # atom i is drawn with probability proportional to (i + 1)^-zipf
    noise: float = 0.05  # Gaussian noise, relative to the signal's root mean square
    seed: int = 0

    def __post_init__(self) -> None:
        # the dictionary's seed is offset so that it never equals a trainer's initial weights (a
        # trainer seeded 0 drawing randn [M, D] would otherwise start on the true atoms)
        g = torch.Generator().manual_seed(1_000_003 + self.seed)
        self.dictionary = torch.nn.functional.normalize(torch.randn(self.atoms, self.d, generator=g), dim=1)
        self.offset = torch.randn(self.d, generator=g)
        self.freq = (torch.arange(self.atoms, dtype=torch.float64) + 1) ** -self.zipf
        self.freq = (self.freq / self.freq.sum()).float()
        self.scale = 1.0
        sample = self._draw(torch.Generator().manual_seed(self.seed + 1), 4096)
        self.scale = float(sample.pow(2).mean().rsqrt())
        self._batches: dict[tuple[int, int], torch.Tensor] = {}

    def _draw(self, g: torch.Generator, n: int) -> torch.Tensor:
        ids = torch.multinomial(self.freq.expand(n, -1), self.active, replacement=False, generator=g)
        mags = torch.empty(n, self.active).exponential_(1.0, generator=g)
        signal = torch.nn.functional.embedding_bag(ids, self.dictionary, per_sample_weights=mags, mode="sum")
        noise = torch.randn(n, self.d, generator=g) * self.noise * signal.pow(2).mean().sqrt()
        return (signal + self.offset + noise) * self.scale

    def batch(self, step: int, n: int) -> torch.Tensor:
        """Tokens of one step: a pure function of (seed, step), drawn once and kept for the next
        trainer (drawing costs more than a training step)."""
        key = (step, n)
        if key not in self._batches:
            self._batches[key] = self._draw(torch.Generator().manual_seed(self.seed * 7919 + 17 + step), n)
        return self._batches[key]

    def held_out(self, n: int) -> torch.Tensor:
        return self.batch(HELD_OUT_SEED, n)


def topk_sae(w_enc, b_enc, w_dec, b_dec, k: int) -> SparseAutoencoder:
    """Our SAE module holding a TopK SAE's weights (W_enc and W_dec [M, D]), whoever trained them."""
    sae = SparseAutoencoder(SAEConfig(d_in=w_enc.shape[1], num_latents=w_enc.shape[0], activation="topk", k=k))
    with torch.no_grad():
        for dst, src in zip((sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec), (w_enc, b_enc, w_dec, b_dec), strict=True):
            dst.copy_(src)
    return sae


def scores(stream: DictionaryStream, sae: SparseAutoencoder, tokens: int = 16384) -> dict:
    """Quality of a TopK SAE against the stream's truth."""
    x = stream.held_out(tokens)
    with torch.no_grad():
        vals, idx = sae.encode_sparse(x)
        x_hat = sae.decode_sparse(vals, idx)
        fvu = float((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
        fired = torch.zeros(sae.num_latents, dtype=torch.bool)
        fired[idx[vals > 0]] = True
        cos = stream.dictionary @ torch.nn.functional.normalize(sae.W_dec, dim=1).T  # [atoms, M]
        best = cos.max(1).values
        precision = cos[:, fired].max(0).values
    return {"fvu": fvu, "l0": float((vals > 0).sum(1).float().mean()), "dead_share": float(1 - fired.float().mean()),
            "recovery": float(best.mean()), "recovered_share": float((best > 0.9).float().mean()),
            "precision": float(precision.mean()) if fired.any() else 0.0}


def train_ours(stream: DictionaryStream, latents: int, k: int, batch: int, steps: int, **overrides) -> dict:
    trainer = SAETrainer(TrainConfig(num_latents=latents, k=k, batch_size=batch, steps=steps, **overrides), stream.d)
    times = []
    for step in range(steps):
        x = stream.batch(step, batch)
        t0 = time.perf_counter()
        trainer.train_step(x)
        times.append(time.perf_counter() - t0)
    result = scores(stream, trainer.sae)
    return {**result, "step_s": statistics.median(times)}


def sparsify_available() -> bool:
    try:
        import schedulefree  # noqa: F401
        import sparsify  # noqa: F401
    except ImportError:
        return False
    return True


def train_sparsify(stream: DictionaryStream, latents: int, k: int, batch: int, steps: int) -> dict:
    """sparsify's SparseCoder trained as its Trainer does by default (FVU loss, no AuxK, signum
    under schedule-free averaging at its learning-rate rule, b_dec from the first batch's mean,
    unit-norm decoder rows), on the same stream."""
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    torch.manual_seed(0)
    sae = SparseCoder(stream.d, SparseCoderConfig(num_latents=latents, k=k))
    opt = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": 5e-3 / (latents / 2**14) ** 0.5}]),
                              momentum=0.95)
    opt.train()
    times = []
    for step in range(steps):
        x = stream.batch(step, batch)
        t0 = time.perf_counter()
        if step == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        sae(x).fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    opt.eval()
    result = scores(stream, topk_sae(sae.encoder.weight, sae.encoder.bias, sae.W_dec, sae.b_dec, k))
    return {**result, "step_s": statistics.median(times)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--atoms", type=int, default=4096, help="true dictionary size")
    p.add_argument("--active", type=int, default=16, help="true atoms per token")
    p.add_argument("--latents", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=2_000_000, help="training tokens, the same for every trainer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-reference", action="store_true", help="skip sparsify even when it is installed")
    p.add_argument("--json", metavar="PATH")


def main(args) -> int:
    stream = DictionaryStream(d=args.d_in, atoms=args.atoms, active=args.active, seed=args.seed)
    steps = max(1, args.tokens // args.batch)
    rows = {"lmm-steer": train_ours(stream, args.latents, args.k, args.batch, steps)}
    if not args.no_reference and sparsify_available():
        import importlib.metadata

        rows[f"sparsify {importlib.metadata.version('eai-sparsify')}"] = train_sparsify(
            stream, args.latents, args.k, args.batch, steps)
    print(f"dictionary d {args.d_in}, {args.atoms} atoms, {args.active} active; SAE {args.latents} latents, k {args.k}; "
          f"{steps} steps of {args.batch} tokens")
    print("| trainer | FVU | dead | L0 | atom recovery (mean max cosine) | atoms recovered > 0.9 | precision | step (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['fvu']:.3f} | {r['dead_share']:.1%} | {r['l0']:.1f} | {r['recovery']:.3f} "
              f"| {r['recovered_share']:.1%} | {r['precision']:.3f} | {r['step_s']:.3f} |")
    if len(rows) > 1:
        ours, ref = rows["lmm-steer"], list(rows.values())[1]
        print(f"ratios (lmm-steer / reference): FVU {ours['fvu'] / ref['fvu']:.2f}, recovery "
              f"{ours['recovery'] / ref['recovery']:.2f}, step time {ours['step_s'] / ref['step_s']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"stream": asdict(stream), "steps": steps, "batch": args.batch,
                       "latents": args.latents, "k": args.k, "rows": rows}, f, indent=2)
    return 0
