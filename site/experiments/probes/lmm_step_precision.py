"""Is `scenes train`'s LMM step faster under bfloat16 autocast or in float32 on this CPU? Times
forward, backward and an AdamW step of the untrained model's rank-8 delta on the same batches in
each precision, after one untimed warm-up step, and prints the table with the ratio.

    python experiments/probes/lmm_step_precision.py DATA_DIR [STEPS] [TURNS] [BATCH]

DATA_DIR is a `scenes generate` split; TURNS and BATCH (default 3 and 1, the tests' tiny run; the
recipe's are 8 and 3) size each step's conversations.
"""

import random
import sys
import time
from pathlib import Path

import torch

from lmm_steer.models.scenes_llava_next import build_untrained
from lmm_steer.scenes.train import SceneConversations, SceneTrainConfig, add_low_rank, answer_loss, encode


def timed(precision: str, data, steps: int, turns: int, batch_size: int) -> dict:
    cfg = SceneTrainConfig()
    loaded = build_untrained()
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    wrapped = add_low_rank(loaded.model, "model.language_model", cfg.rank)
    params = [t for layer in wrapped.values() for t in (layer.A, layer.B)]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    loaded.model.train()
    rows = []
    for step in range(1000, 1001 + steps):
        rng = random.Random(f"{cfg.seed}:{step}")
        batch = encode(loaded.processor, [data.sample(rng, turns, cfg.region_share, 0.0, cfg.binding_turns)
                                          for _ in range(batch_size)], data.root)
        t0 = time.monotonic()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = answer_loss(loaded.model, batch)
        t1 = time.monotonic()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.monotonic()
        opt.step()
        rows.append((t1 - t0, t2 - t1, time.monotonic() - t0))
    timed_rows = rows[1:]  # the first step warms up
    return {k: sum(r[i] for r in timed_rows) / steps for i, k in enumerate(("forward", "backward", "step"))}


def main() -> None:
    data = SceneConversations(Path(sys.argv[1]))
    given = [int(a) for a in sys.argv[2:5]]
    steps, turns, batch = given + [2, 3, 1][len(given):]
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; {steps} timed steps of {batch} conversation(s) of {turns} turns\n")
    got = {p: timed(p, data, steps, turns, batch) for p in ("fp32", "bf16")}
    print("| precision | forward s | backward s | step s | step / fp32 step |")
    print("|---|---|---|---|---|")
    for p, r in got.items():
        print(f"| {p} | {r['forward']:.2f} | {r['backward']:.2f} | {r['step']:.2f} | {r['step'] / got['fp32']['step']:.2f} |")


if __name__ == "__main__":
    main()
