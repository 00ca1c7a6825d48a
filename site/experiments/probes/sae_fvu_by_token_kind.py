"""Probe for issue #16: how well does an SAE reconstruct image tokens against text tokens?

`sae train` reports one FVU over its training batches, where a scene's 336 image tokens outnumber
its text tokens and many of them show plain background. This probe splits the FVU of held-out
conversations by kind of position: image placeholders (base view and tiles) and the rest.
`sae train` holds out the first --eval-examples rows of --data (32 by default), so the first 32
rows are never trained on.

    python experiments/probes/sae_fvu_by_token_kind.py MODEL SAE_DIR DATA.jsonl [N]
"""

from __future__ import annotations

import itertools
import json
import sys

import torch

from lmm_steer.engine.factory import build_engine
from lmm_steer.engine.prefill import image_token_id
from lmm_steer.training.activations import encoded, hidden_states
from lmm_steer.training.data import iter_examples


def main(model: str, sae: str, data: str, n: int = 32) -> None:
    engine = build_engine(model, sae, hookpoint="model.layers.15", device="cpu")
    placeholder = image_token_id(engine.model)
    xs = {"image": [], "text": []}
    errs = {"image": [], "text": []}
    examples = itertools.islice(iter_examples(data), n)
    for inputs in encoded(engine.loaded, examples, max_len=640):
        h, _ = hidden_states(engine.loaded, engine.hook_index, inputs)
        h = h[0, 1:].float()  # the attention-sink position is left out, as training does
        ids = inputs["input_ids"][0, 1:]
        recon = engine.sae(h.to(engine.sae.W_dec.dtype)).float()
        is_image = ids == placeholder
        for kind, sel in (("image", is_image), ("text", ~is_image)):
            xs[kind].append(h[sel])
            errs[kind].append((h[sel] - recon[sel]).pow(2).sum(-1))
    out = {}
    for kind in ("image", "text"):
        x = torch.cat(xs[kind])
        err = torch.cat(errs[kind]).sum()
        total = (x - x.mean(0)).pow(2).sum()
        out[kind] = {"tokens": int(x.shape[0]), "fvu": float(err / total)}
    x = torch.cat(xs["image"] + xs["text"])
    out["all"] = {"tokens": int(x.shape[0]),
                  "fvu": float(torch.cat(errs["image"] + errs["text"]).sum() / (x - x.mean(0)).pow(2).sum())}
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], *(int(a) for a in sys.argv[4:5]))
