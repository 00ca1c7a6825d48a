"""Probe for issue #16: the LMM step with and without the attention mask.

`answer_loss` passes no attention mask (right padding, causal attention). This probe times the
forward and backward pass of the first 3 batches of `scenes train` (seed 0) both ways, twice each,
on a trained file with a random non-zero delta, and prints each step's loss, which must agree.

    python experiments/probes/answer_loss_mask.py WEIGHTS.safetensors SCENES_TRAIN_DIR
"""

import random
import sys
import time
from pathlib import Path

import torch

from lmm_steer.models.scenes_llava_next import apply_trained, build_untrained, read_weights
from lmm_steer.scenes.train import SceneConversations, add_low_rank, answer_loss, encode


def main(weights: str, data_dir: str) -> None:
    state, architecture = read_weights(Path(weights))
    loaded = build_untrained(architecture, seed=0)
    apply_trained(loaded.model, {k: v.float() for k, v in state.items() if not k.endswith((".lora_A", ".lora_B"))})
    model = loaded.model
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in add_low_rank(model, "model.language_model", 8).values():
        layer.A.requires_grad_(True)
        layer.B.requires_grad_(True)
        with torch.no_grad():
            layer.B.normal_(0, 0.01)
    data = SceneConversations(Path(data_dir))
    model.train()
    for mode in ("mask", "no mask", "mask", "no mask"):
        for step in range(3):
            batch = encode(loaded.processor, [data.sample(random.Random(f"0:{step}"), 8, 0.2) for _ in range(3)], data.root)
            started = time.monotonic()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = answer_loss(model, batch) if mode == "no mask" else _masked_loss(model, batch)
            loss.backward()
            print(mode, step, tuple(batch["input_ids"].shape), round(loss.item(), 5), round(time.monotonic() - started, 2))


def _masked_loss(model, batch) -> torch.Tensor:
    """answer_loss as it was before the change: the padding mask passed in."""
    import torch.nn.functional as F

    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"]).last_hidden_state
    targets = batch["labels_mask"][:, 1:]
    logits = model.lm_head(hidden[:, :-1][targets])
    return F.cross_entropy(logits.float(), batch["input_ids"][:, 1:][targets])


if __name__ == "__main__":
    main(*sys.argv[1:3])
