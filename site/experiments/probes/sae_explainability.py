"""How explainable can an SAE's image features be under `sae score`'s IoU, before any explainer
runs? Ranks every feature's top images on a split as `sae explain` does (base-grid patches, the
image alone), then takes each feature's best explanation (`best_iou`: the exact bound under the
annotation grounder) and prints the bound's mean over all features and over the best N.

    python experiments/probes/sae_explainability.py MODEL SAE_DIR SPLIT [HOOKPOINT]
"""

import sys
from pathlib import Path

import numpy as np

from lmm_steer.explain.score import feature_ious, load_annotations
from lmm_steer.explain.top_images import top_images
from lmm_steer.scenes.commands import scene_engine


def main(model: str, sae: str, split: str, hookpoint: str = "model.layers.15") -> None:
    data = Path(split)
    engine = scene_engine(model, None, sae, hookpoint)
    images = [str(p) for p in sorted((data / "images").glob("*.png"))]
    tops = top_images(engine, images, 5)
    ann, shapes = load_annotations(data / "annotations.json"), {}
    bounds = np.sort([feature_ious(ann, "", rows, shapes)["best_iou"] for rows in tops.values()])[::-1]
    print(f"{sae}: {len(bounds)} features fire on the base patches of {len(images)} images; bound {bounds.mean():.3f}; "
          f"at least 0.40: {(bounds >= 0.4).sum()}; "
          + ", ".join(f"best {n}: {bounds[:n].mean():.3f}" for n in (100, 200, 300, 400, 500, 1000)))


if __name__ == "__main__":
    main(*sys.argv[1:])
