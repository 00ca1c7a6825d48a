"""Why do `scenes train`'s LMM steps slow down as the stage goes on (5.6 s a step at first, 7.2 s at
the end of runs 10 and 11)? Times the same batches under the run's start state (the delta at zero)
and its end state (the trained delta), with and without flushing denormal floats to zero.

    python experiments/probes/lmm_step_pace.py RUN_DIR DATA_DIR [STEPS]

RUN_DIR holds a finished run's scenes-llava-next.safetensors; DATA_DIR is its training split. The
same steps' batches (the run's own draw for steps 1000, 1001, ...) go through forward, backward and
an AdamW step in each setting, after one untimed warm-up step; the table gives seconds per step.
"""

import random
import sys
import time
from pathlib import Path

import torch

from lmm_steer.models.scenes_llava_next import apply_trained, build_untrained, read_weights
from lmm_steer.scenes.train import SceneConversations, SceneTrainConfig, add_low_rank, answer_loss, encode


def timed_steps(state: dict, zero_delta: bool, flush: bool, data, steps: int) -> float:
    cfg = SceneTrainConfig()
    loaded = build_untrained(read_weights(Path(sys.argv[1]) / "scenes-llava-next.safetensors")[1])
    apply_trained(loaded.model, {k: v.float() for k, v in state.items() if not k.endswith((".lora_A", ".lora_B"))})
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    wrapped = add_low_rank(loaded.model, "model.language_model", cfg.rank)
    params = []
    with torch.no_grad():
        for name, layer in wrapped.items():
            layer.A.copy_(state[f"{name}.lora_A"].float())
            layer.B.copy_(torch.zeros_like(layer.B) if zero_delta else state[f"{name}.lora_B"].float())
            params += [layer.A, layer.B]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    torch.set_flush_denormal(flush)
    loaded.model.train()
    times = []
    for step in range(1000, 1001 + steps):
        rng = random.Random(f"{cfg.seed}:{step}")
        batch = encode(loaded.processor, [data.sample(rng, cfg.turns, cfg.region_share, 0.0, cfg.binding_turns)
                                          for _ in range(cfg.batch)], data.root)
        started = time.monotonic()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = answer_loss(loaded.model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.monotonic() - started)
    torch.set_flush_denormal(False)
    return sum(times[1:]) / steps


def main() -> None:
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 6
    state, _ = read_weights(Path(sys.argv[1]) / "scenes-llava-next.safetensors")
    data = SceneConversations(Path(sys.argv[2]))
    print("| delta | flush denormals | s / step |\n|---|---|---|")
    for zero_delta, flush in ((True, False), (False, False), (False, True), (True, True)):
        pace = timed_steps(state, zero_delta, flush, data, steps)
        print(f"| {'zero (start)' if zero_delta else 'trained (end)'} | {flush} | {pace:.2f} |", flush=True)


if __name__ == "__main__":
    main()
