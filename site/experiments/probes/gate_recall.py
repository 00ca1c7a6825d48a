"""How well does a gate find the asked object? For colour and shape questions about one object
("What colour is the circle?": the gate is a circle feature), on each image token (the base 8x8
grid and the 16x16 tile grid), does the gate open (z > 0 after TopK; or the pre-activation above 0
or 1) on the asked object's tokens (patch share >= 0.25), and how much of what it opens lies on
objects of that value. Two gate choices per value: `scenes localise`'s (ground truth of the
selection split) and `eval fix`'s search-tested one (the model's answers there).

    python experiments/probes/gate_recall.py SPLIT N_SCENES LOCALISE_JSON FIX_JSON
"""
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lmm_steer.engine.hookpoint import capture_block_output
from lmm_steer.engine.prefill import image_token_id
from lmm_steer.eval.fix import _words
from lmm_steer.models.inputs import build_inputs
from lmm_steer.scenes.commands import scene_engine
from lmm_steer.scenes.generate import patch_shares, rle_decode

data, n_scenes = Path(sys.argv[1]), int(sys.argv[2])
localised = json.loads(Path(sys.argv[3]).read_text())["values"]
tested = json.loads(Path(sys.argv[4]).read_text())["tested"]
gates = {k: {"localised": v["feature"], "tested": tested[k]["feature"]} for k, v in localised.items()}
engine = scene_engine("builtin:scenes-llava-next", None, None, None)
sae, image_token = engine.sae, image_token_id(engine.model)
coco = json.loads((data / "annotations.json").read_text())
cats = {c["id"]: c["name"] for c in coco["categories"]}
files = {im["id"]: im["file_name"] for im in coco["images"]}
objs = defaultdict(list)
for a in coco["annotations"]:
    objs[files[a["image_id"]]].append(a)
rows = [json.loads(line) for line in (data / "conversations.jsonl").read_text().splitlines()]
scenes = sorted({r["image"] for r in rows})[:n_scenes]
rows = [r for r in rows if r["image"] in scenes and r["type"] in ("colour", "shape") and len(r["objects"]) == 1]

def token_mask(mask):
    base = patch_shares(mask, 8, 8) >= 0.25
    tile = (patch_shares(mask, 16, 16) >= 0.25).reshape(16, 16)
    tile = np.concatenate([tile, np.zeros((16, 1), bool)], 1).reshape(-1)
    return np.concatenate([base, tile])

stats = defaultdict(lambda: defaultdict(list))
for r in rows:
    q = r["conversations"][0]["value"].removeprefix("<image>\n")
    named = [k for k in _words(q) if k.split(":")[0] != r["type"]]
    if not named or named[0] not in gates:
        continue
    key = named[0]
    field, value = key.split(":")
    anns = objs[r["image"]]
    target = anns[r["objects"][0]]
    on_obj = token_mask(rle_decode(target["segmentation"]).astype(bool))
    on_value = np.zeros_like(on_obj)
    for a in anns:
        if (cats[a["category_id"]] if field == "shape" else a["attributes"]["colour"]) == value:
            on_value |= token_mask(rle_decode(a["segmentation"]).astype(bool))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
    with Image.open(data / r["image"]) as im:
        inputs = build_inputs(engine.loaded, messages, [im.convert("RGB")])
    with torch.inference_mode():
        h = capture_block_output(engine.model, engine.hook_index, inputs)[0].to(sae.W_dec.dtype)
        img = h[inputs["input_ids"][0] == image_token]
        pre = sae.pre_activations(img)
        z = sae.encode(img)
    small = "small" in r["difficulty"]
    for name, g in gates[key].items():
        for rule, opened in (("z>0", (z[:, g] > 0).numpy()), ("pre>0", (pre[:, g] > 0).numpy()),
                             ("pre>1", (pre[:, g] > 1).numpy())):
            s = stats[(name, rule, "small" if small else "other")]
            s["hit"].append(bool((opened & on_obj).any()))
            s["recall"].append((opened & on_obj).sum() / max(on_obj.sum(), 1))
            s["opened"].append(opened.sum())
            s["precision"].append((opened & on_value).sum() / opened.sum() if opened.sum() else np.nan)
print("gate | rule | objects | hit | recall | tokens opened | on the value's objects")
for (name, rule, kind), s in sorted(stats.items()):
    print(f"{name} | {rule} | {kind} {len(s['hit'])} | {np.mean(s['hit']):.2f} | {np.mean(s['recall']):.2f} | "
          f"{np.mean(s['opened']):.1f} | {np.nanmean(s['precision']):.2f}")
