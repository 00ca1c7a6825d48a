"""Where a gated `eval fix` run's gates open: for each colour and shape misrecognition of its JSON,
on how many of the image's tokens each edited feature and each gate fires at the SAE's block
(a gate that never fires leaves its edit without effect).

    python experiments/probes/gate_openings.py FIX_JSON [ROW]      # ROW: search (default), search-tested, oracle
"""

import json
import sys
from pathlib import Path

import torch
from PIL import Image

from lmm_steer.engine.hookpoint import capture_block_output
from lmm_steer.engine.prefill import image_token_id
from lmm_steer.engine.steering import feature_activations
from lmm_steer.models.inputs import build_inputs
from lmm_steer.scenes.commands import scene_engine


def main(path: str, row: str = "search") -> None:
    result = json.loads(Path(path).read_text())
    data = Path(result["data"])
    engine = scene_engine("builtin:scenes-llava-next", None, None, None)
    sae, image_token = engine.sae, image_token_id(engine.model)
    for case in result["cases"]:
        edits = case["edits"].get(row) or []
        if case["type"] not in ("colour", "shape") or not edits:
            continue
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": case["question"]}]}]
        with Image.open(data / case["image"]) as im:
            inputs = build_inputs(engine.loaded, messages, [im.convert("RGB")])
        ids = sorted({e["id"] for e in edits} | {e["where"] for e in edits if "where" in e})
        with torch.inference_mode():
            h = capture_block_output(engine.model, engine.hook_index, inputs)[0].to(sae.W_dec.dtype)
            on_image = h[inputs["input_ids"][0] == image_token]
            z = feature_activations(sae, on_image, torch.tensor(ids).expand(on_image.shape[0], -1))[2]
        fires = {f: int((z[:, i] > 0).sum()) for i, f in enumerate(ids)}
        gates = sorted({e["where"] for e in edits if "where" in e})
        print(json.dumps({"type": case["type"], "answer": case["answer"], "said": case["got"],
                          "difficulty": case["difficulty"], "image_tokens": on_image.shape[0],
                          "gates": gates, "fires_on_tokens": fires, "steered": case["answers"].get(row)}))


if __name__ == "__main__":
    main(*sys.argv[1:])
