"""How well do the SAE codes `preset fit` reads tell the model's right answers from its wrong ones?

Reads a fit split's pass kept by `preset fit --fit-cache` (the answers and pooled codes), and for
every question and for the existence questions whose truth is "yes" alone, fits L1 logistic probes
(class-balanced, as `preset fit` does) at several penalties and reports their cross-validated ROC AUC
and balanced accuracy: a probe near 0.5 has no direction to steer along. The dense residual at the
hook block (mean over the image) is the non-SAE reference.

    python experiments/probes/fit_separability.py scenes-31 fit-31-pass.safetensors
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from safetensors.torch import load_file
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_validate

from lmm_steer.fit.examples import load_examples
from lmm_steer.scenes.evaluate import normalise


def scores(x: np.ndarray, y: np.ndarray, c: float) -> tuple[float, float, float]:
    scale = np.maximum(np.abs(x).max(0), 1e-6)
    model = LogisticRegression(l1_ratio=1.0, C=c, solver="liblinear", class_weight="balanced", max_iter=2000)
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    out = cross_validate(model, x / scale, y, cv=folds, scoring=("roc_auc", "balanced_accuracy"),
                         return_estimator=True)
    kept = np.mean([np.count_nonzero(e.coef_) for e in out["estimator"]])
    return float(out["test_roc_auc"].mean()), float(out["test_balanced_accuracy"].mean()), float(kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="the fit split (a `scenes generate` directory)")
    parser.add_argument("cache", help="the safetensors file `preset fit --fit-cache` wrote for it")
    parser.add_argument("--c", default="0.05,0.1,0.5,2", help="inverse L1 penalties")
    args = parser.parse_args()
    _, items = load_examples(args.data, None, ("colour", "shape", "exist"))
    from safetensors import safe_open

    with safe_open(args.cache, framework="pt") as f:
        answers = json.loads(f.metadata()["answers"])
    codes = {k: v.float().numpy() for k, v in load_file(args.cache).items()}
    right = np.array([normalise(a) == normalise(q["answer"]) for q, a in zip(items, answers, strict=True)], int)
    present = np.array([q["type"] == "exist" and normalise(q["answer"]) == "yes" for q in items])
    sae = np.concatenate([codes["image"], codes["text"], codes["last"]], axis=1)
    print(f"{len(items)} questions, {int((1 - right).sum())} wrong; existence 'yes' questions {int(present.sum())}, "
          f"{int((1 - right[present]).sum())} answered 'no'\n")
    print("| questions | inputs | C | features kept | ROC AUC (5-fold) | balanced accuracy |")
    print("|---|---|---|---|---|---|")
    for name, mask in (("all", np.ones(len(items), bool)), ("exist, truth yes", present)):
        for inputs, x in (("SAE codes", sae), ("residual", codes["residual"])):
            for c in (float(v) for v in args.c.split(",")):
                auc, bacc, kept = scores(x[mask], right[mask], c)
                print(f"| {name} | {inputs} | {c:g} | {kept:.0f} | {auc:.3f} | {bacc:.3f} |")


if __name__ == "__main__":
    main()
