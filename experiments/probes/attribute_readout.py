"""Is what the scenes model misreads still readable where the SAE sits? For every object of a fit
split, the residual stream over the image patches the object covers (at least half of a patch's
pixels, or its most covered patch) is averaged at a few decoder blocks, and a linear probe per
attribute (colour, shape) is fitted on it. On a second split the model is asked its colour and shape
questions; for each question, the probe reads the asked object's value from the same positions.
Where the model answers wrong but the probe reads the truth, the information is there at that block
and a steering at it could in principle recover it; where the probe reads wrong too, it was lost
before (in the vision tower or the projector) and no edit at the block can bring it back. Each
wrong answer is also checked against the scene: is the value it names another object's (a binding
error: the right attribute read off the wrong object)? Against chance: the share of the wrong
answer's possible values (every value but the truth) that some other object of the scene has.

    python experiments/probes/attribute_readout.py scenes-31 scenes-32 --layers 0,8,hook,23 --json readout.json
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import scenes_probe
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from lmm_steer.engine.hookpoint import block_hidden, language_model
from lmm_steer.engine.inspect import image_grids
from lmm_steer.fit.answers import SplitAnswers
from lmm_steer.fit.examples import load_examples
from lmm_steer.models.inputs import build_inputs
from lmm_steer.scenes.evaluate import normalise
from lmm_steer.scenes.generate import patch_shares, rle_decode
from lmm_steer.scenes.localise import DESCRIBE

ATTRIBUTES = ("colour", "shape")


def object_masks(data: Path) -> dict[str, list[tuple[dict, np.ndarray]]]:
    """``image file -> [(attributes, visible mask)]`` in the scene's object order."""
    coco = json.loads((data / "annotations.json").read_text())
    shapes = {c["id"]: c["name"] for c in coco["categories"]}
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    out: dict[str, list] = defaultdict(list)
    for ann in coco["annotations"]:
        values = {"colour": ann["attributes"]["colour"], "shape": shapes[ann["category_id"]]}
        out[files[ann["image_id"]]].append((values, rle_decode(ann["segmentation"])))
    return out


def residuals(engine, image_path: Path, layers: list[int]) -> tuple[dict[int, torch.Tensor], int, int]:
    """``layer -> [patches, D]`` block outputs on the base view's patches, and the grid shape."""
    with Image.open(image_path) as im:
        image = im.convert("RGB")
    inputs = {k: v.to(engine.model.device) for k, v in build_inputs(engine.loaded, DESCRIBE, [image]).items()}
    (positions, rows, cols), *_ = image_grids(engine.loaded, inputs)
    got, handles = {}, []
    blocks = language_model(engine.model).layers
    for i in layers:
        handles.append(blocks[i].register_forward_hook(
            lambda m, a, out, i=i: got.__setitem__(i, block_hidden(out)[0, positions].float().cpu())))
    try:
        with torch.no_grad():
            engine.model(**inputs, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return got, rows, cols


def object_vectors(engine, data: Path, layers: list[int]):
    """``(image, object index) -> {layer: mean residual over the object's patches}``, and its values."""
    vectors, values = {}, {}
    for file, objects in object_masks(data).items():
        hs, rows, cols = residuals(engine, data / file, layers)
        for j, (vals, mask) in enumerate(objects):
            share = patch_shares(mask, rows, cols)
            patches = np.flatnonzero(share >= 0.5) if (share >= 0.5).any() else [int(share.argmax())]
            vectors[file, j] = {i: hs[i][patches].mean(0).numpy() for i in layers}
            values[file, j] = vals
    return vectors, values


def asked_objects(data: Path) -> dict[tuple[str, str], int]:
    """``(image, question) -> index of the object it asks about`` (the split's LLaVA JSONL)."""
    out = {}
    for line in (data / "conversations.jsonl").read_text().splitlines():
        row = json.loads(line)
        question = row["conversations"][0]["value"].removeprefix("<image>\n")
        if row["objects"]:
            out[row["image"], question] = row["objects"][0]
    return out


def binding(data: Path, items: list[dict], said: list[str], asked: dict) -> dict:
    """Per attribute: wrong answers, how many name another object's value, and the count expected if
    each wrong answer were any value but the truth, uniformly."""
    scenes = {s["file"]: s["objects"] for s in json.loads((data / "scenes.json").read_text())["scenes"]}
    values = {attr: sorted({o[attr] for objects in scenes.values() for o in objects}) for attr in ATTRIBUTES}
    out = {attr: {"wrong": 0, "another_object": 0, "chance": 0.0} for attr in ATTRIBUTES}
    for item, s in zip(items, said, strict=True):
        attr = item["type"]
        if s == item["answer"]:
            continue
        j = asked[item["image"], item["question"]]
        others = {o[attr] for o in scenes[item["image"]] if o["id"] != j} - {item["answer"]}
        out[attr]["wrong"] += 1
        out[attr]["another_object"] += s in others
        out[attr]["chance"] += len(others) / (len(values[attr]) - 1)
    return {attr: {**b, "chance": round(b["chance"], 2)} for attr, b in out.items()}


def main() -> int:
    p = scenes_probe.parser(__doc__)
    p.add_argument("fit", help="split the probes are fitted on (every object)")
    p.add_argument("test", help="split whose colour and shape questions are asked")
    p.add_argument("--layers", default="0,hook", help="decoder blocks, 'hook' for the SAE's")
    args = p.parse_args()
    t0 = time.perf_counter()
    engine = scenes_probe.engine(args.threads)
    layers = sorted({engine.hook_index if x == "hook" else int(x) for x in args.layers.split(",")})
    fit_vec, fit_val = object_vectors(engine, Path(args.fit), layers)
    test_vec, test_val = object_vectors(engine, Path(args.test), layers)
    root, items = load_examples(args.test, None, ATTRIBUTES)
    said = [normalise(a) for a in SplitAnswers(engine, root)(items, [None])[0]]
    asked = asked_objects(Path(args.test))
    record = {"command": f"python experiments/probes/attribute_readout.py {args.fit} {args.test} --layers {args.layers}",
              "layers": layers, "hook": engine.hook_index, "fit_objects": len(fit_vec), "rows": {}}
    print("| block | attribute | probe accuracy, test objects | model right: probe right | model wrong: probe reads the truth"
          " | probe reads the model's answer | probe reads another |\n|---|---|---|---|---|---|---|")
    keys, tkeys = sorted(fit_vec), sorted(test_vec)
    for layer in layers:
        x_fit = np.stack([fit_vec[k][layer] for k in keys])
        x_test = np.stack([test_vec[k][layer] for k in tkeys])
        for attr in ATTRIBUTES:
            probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
            probe.fit(x_fit, [fit_val[k][attr] for k in keys])
            pred = dict(zip(tkeys, probe.predict(x_test), strict=True))
            accuracy = np.mean([pred[k] == test_val[k][attr] for k in tkeys])
            c = Counter()
            for item, s in zip(items, said, strict=True):
                if item["type"] != attr:
                    continue
                k = (item["image"], asked[item["image"], item["question"]])
                truth, read = item["answer"], pred[k]
                if s == truth:
                    c["right", read == truth] += 1
                else:
                    c["wrong", "truth" if read == truth else "said" if read == s else "other"] += 1
            right = c["right", True] + c["right", False]
            wrong = c["wrong", "truth"] + c["wrong", "said"] + c["wrong", "other"]
            row = {"probe_accuracy": round(float(accuracy), 3), "model_right": right,
                   "right_probe_right": c["right", True], "model_wrong": wrong,
                   **{f"wrong_probe_{x}": c["wrong", x] for x in ("truth", "said", "other")}}
            record["rows"][f"{layer}:{attr}"] = row
            print(f"| {layer}{' (SAE)' if layer == engine.hook_index else ''} | {attr} | {accuracy:.3f} | "
                  f"{c['right', True]} of {right} | {c['wrong', 'truth']} of {wrong} | {c['wrong', 'said']} | "
                  f"{c['wrong', 'other']} |")
    record["binding"] = binding(Path(args.test), items, said, asked)
    print("| attribute | wrong answers | naming another object's value | chance |\n|---|---|---|---|")
    for attr, b in record["binding"].items():
        print(f"| {attr} | {b['wrong']} | {b['another_object']} | {b['chance']:.2f} |")
    record["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps({"seconds": record["seconds"], "fit_objects": len(fit_vec)}))
    return scenes_probe.save(args.json, record)


if __name__ == "__main__":
    raise SystemExit(main())
