"""The best explanation's IoU (`sae score`'s `best_iou`: the exact bound under the annotation
grounder) over every feature an explain run asked about, declined ones included, beside the run's
own IoU (a declined feature scores 0) and the single-region ceiling; then the bound over every
feature with top images in the output (all that fire on the split's images), best N first.

    python experiments/probes/explanation_bound.py SPLIT EXPLAIN_OUT [PER_FEATURE_JSON]
"""
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from lmm_steer.explain.score import feature_ious, load_annotations

data, run = Path(sys.argv[1]), Path(sys.argv[2])
ann = load_annotations(data / "annotations.json")
rows = [r for r in map(json.loads, run.read_text().splitlines()) if r.get("top_images")]
shapes, per, bounds = {}, [], []
for r in rows:  # one pass: the bound does not depend on the explanation, so asked rows give both
    got = feature_ious(ann, r.get("explanation") or "", r["top_images"], shapes)
    bounds.append(got["best_iou"])
    if r.get("explainer"):
        per.append({"feature": r["feature"], "explained": bool(r["explanation"]), "iou": got["iou"],
                    "best_iou": got["best_iou"], "ceiling_iou": got["ceiling_iou"], "best_phrase": got["best_phrase"]})
for name, sel in (("all asked", per), ("explained", [p for p in per if p["explained"]]), ("declined", [p for p in per if not p["explained"]])):
    if sel:
        print(f"{name}: {len(sel)} features; IoU {np.mean([p['iou'] for p in sel]):.3f}, best explanation {np.mean([p['best_iou'] for p in sel]):.3f}, "
              f"single-region ceiling {np.mean([p['ceiling_iou'] for p in sel]):.3f}; best >= 0.40: {sum(p['best_iou'] >= 0.4 for p in sel)}")
print(Counter(" ".join(v for _, v in p["best_phrase"]) for p in per).most_common(10))
bounds = np.sort(bounds)[::-1]
print(f"every feature with top images: {len(bounds)}, bound {bounds.mean():.3f}; at least 0.40: {(bounds >= 0.4).sum()}; "
      + ", ".join(f"best {n}: {bounds[:n].mean():.3f}" for n in (100, 200, 300, 400, 500, 1000)))
if len(sys.argv) > 3:
    Path(sys.argv[3]).write_text(json.dumps(per) + "\n")
