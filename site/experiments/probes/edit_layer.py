"""At which block does an edit on an object's own tokens still change what the model says about it?
The SAE sits at block 15 of 30; a gated clamp there writes only on the asked object's tokens. This
probe asks the question without an SAE: for colour questions about one object, it adds a colour
direction (the mean block-L output on that colour's objects' tokens minus the mean on all objects'
tokens, from another split) times ALPHA at block L, on the asked object's tokens only, on the text
tokens after the image only, or on every image token, and counts how often the model then names
that colour (a colour other than the object's, drawn per question with a fixed seed).

    python experiments/probes/edit_layer.py MEANS_SPLIT N_MEAN_SCENES TEST_SPLIT N_TEST_SCENES [ALPHA [BLOCKS [PLACES]]]

BLOCKS (comma-separated) default to 4,10,15,20; PLACES to object,text,image.
"""
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lmm_steer.engine.hookpoint import block_hidden, language_model
from lmm_steer.engine.prefill import image_token_id
from lmm_steer.models.inputs import build_inputs
from lmm_steer.scenes.commands import scene_engine
from lmm_steer.scenes.evaluate import normalise
from lmm_steer.scenes.generate import COLOURS, patch_shares, rle_decode

means_split, n_means, test_split, n_test = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
alpha = float(sys.argv[5]) if len(sys.argv) > 5 else 4.0
LAYERS = tuple(int(b) for b in sys.argv[6].split(",")) if len(sys.argv) > 6 else (4, 10, 15, 20)
PLACES = tuple(sys.argv[7].split(",")) if len(sys.argv) > 7 else ("object", "text", "image")
engine = scene_engine("builtin:scenes-llava-next", None, None, None)
model, tokenizer, image_token = engine.model, engine.loaded.tokenizer, image_token_id(engine.model)
blocks = language_model(model).layers


def token_mask(mask):
    """The image tokens (base 8x8, then the 16x16 tile grid with its newline column) an object covers."""
    base = patch_shares(mask, 8, 8) >= 0.25
    tile = (patch_shares(mask, 16, 16) >= 0.25).reshape(16, 16)
    return np.concatenate([base, np.concatenate([tile, np.zeros((16, 1), bool)], 1).reshape(-1)])


def scene_objects(split):
    coco = json.loads((split / "annotations.json").read_text())
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    out = defaultdict(list)
    for a in coco["annotations"]:
        out[files[a["image_id"]]].append(a)
    return out


def inputs_for(split, image, question):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    with Image.open(split / image) as im:
        return build_inputs(engine.loaded, messages, [im.convert("RGB")])


# colour directions per block, from another split's objects
sums = {L: defaultdict(lambda: 0.0) for L in LAYERS}
counts = defaultdict(int)
objects = scene_objects(means_split)
for image in sorted(objects)[:n_means]:
    inputs = inputs_for(means_split, image, "What colour is the circle?")
    with torch.inference_mode():
        hidden = model(**inputs, output_hidden_states=True, logits_to_keep=1).hidden_states
    is_image = inputs["input_ids"][0] == image_token
    for a in objects[image]:
        on = torch.from_numpy(token_mask(rle_decode(a["segmentation"]).astype(bool)))
        if not on.any():
            continue
        colour = a["attributes"]["colour"]
        for L in LAYERS:
            h = hidden[L + 1][0][is_image][on].float().sum(0)  # hidden_states[L + 1]: block L's output
            sums[L][colour] = sums[L][colour] + h
            sums[L]["all"] = sums[L]["all"] + h
        counts[colour] += int(on.sum())
        counts["all"] += int(on.sum())
direction = {L: {c: sums[L][c] / counts[c] - sums[L]["all"] / counts["all"] for c in COLOURS} for L in LAYERS}


def answer(inputs, layer=None, vector=None, where=None):
    """The greedy answer's first two tokens (a cached second step), special tokens dropped; with
    ``vector`` added to block ``layer``'s output at the prompt positions ``where`` (a bool mask)."""

    def hook(module, args, output):
        h = block_hidden(output)
        if h.shape[1] == where.shape[0]:  # the prompt's pass; the cached step is not edited
            h[0][where] += vector.to(h.dtype)

    handle = blocks[layer].register_forward_hook(hook) if layer is not None else None
    try:
        with torch.inference_mode():
            out = model(**inputs, use_cache=True, logits_to_keep=1)
            first = out.logits[0, -1].argmax().view(1, 1)
            mask = torch.ones(1, inputs["input_ids"].shape[1] + 1, dtype=inputs["attention_mask"].dtype)
            second = model(input_ids=first, attention_mask=mask, past_key_values=out.past_key_values,
                           logits_to_keep=1).logits[0, -1].argmax().view(1, 1)
    finally:
        if handle is not None:
            handle.remove()
    return tokenizer.decode(torch.cat([first, second], 1)[0], skip_special_tokens=True)


rows = [json.loads(line) for line in (test_split / "conversations.jsonl").read_text().splitlines()]
scenes = sorted({r["image"] for r in rows})[:n_test]
rows = [r for r in rows if r["image"] in scenes and r["type"] == "colour" and len(r["objects"]) == 1]
objects = scene_objects(test_split)
rng = random.Random(0)
said = defaultdict(int)
unsteered_right = 0
for i, r in enumerate(rows):
    print(f"question {i + 1} of {len(rows)}", file=sys.stderr, flush=True)
    question = r["conversations"][0]["value"].removeprefix("<image>\n")
    truth = r["conversations"][1]["value"]
    target = rng.choice([c for c in COLOURS if c != normalise(truth)])
    inputs = inputs_for(test_split, r["image"], question)
    ids = inputs["input_ids"][0]
    is_image = ids == image_token
    on = torch.zeros_like(is_image)
    on[is_image] = torch.from_numpy(token_mask(rle_decode(objects[r["image"]][r["objects"][0]]["segmentation"]).astype(bool)))
    after_image = torch.arange(len(ids)) > int(is_image.nonzero().max())
    places = {"object": on, "text": after_image, "image": is_image}
    unsteered_right += normalise(answer(inputs)) == normalise(truth)
    for L in LAYERS:
        for place in PLACES:
            said[L, place] += normalise(answer(inputs, L, alpha * direction[L][target], places[place])) == target
n = len(rows)
print(f"{n} colour questions about one object ({n_test} scenes of {test_split}); unsteered right {unsteered_right}; "
      f"directions from {n_means} scenes of {means_split}; alpha {alpha:g}")
print("| block | " + " | ".join(f"added on {p} tokens" for p in PLACES) + " |")
print("|---|" + "---|" * len(PLACES))
for L in LAYERS:
    print(f"| {L} | " + " | ".join(f"{said[L, p]} of {n} ({said[L, p] / n:.0%})" for p in PLACES) + " |")
