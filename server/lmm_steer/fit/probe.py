"""A sparse linear probe on pooled SAE codes: which features tell right answers from wrong ones.

scikit-learn's L1-penalised logistic regression (liblinear), with classes weighted by their
frequency (wrong answers are the rarer class) and codes divided by each feature's largest pooled
value, so the penalty treats weak and strong features alike. A feature's weight is positive when
its firing predicts a right answer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class ProbeUnavailable(RuntimeError):
    """scikit-learn is missing (the ``fit`` extra)."""


@dataclass
class Probe:
    weights: dict[str, dict[int, float]]  # pool -> feature -> weight (non-zero only)
    c: float
    train_accuracy: float
    n: int
    wrong: int

    def ranked(self, sign: int, pools=("image", "text", "last")) -> list[tuple[str, int, float]]:
        """``(pool, feature, weight)`` of the features whose weight has ``sign``, strongest first; a
        feature in both pools counts once, at its stronger weight."""
        best: dict[int, tuple[str, float]] = {}
        for pool in pools:
            for f, w in self.weights.get(pool, {}).items():
                if w * sign > 0 and (f not in best or abs(w) > abs(best[f][1])):
                    best[f] = (pool, w)
        return sorted(((p, f, w) for f, (p, w) in best.items()), key=lambda t: -abs(t[2]))


def fit_probe(codes: dict[str, torch.Tensor], right: list[bool], c: float = 0.05, pools=("image", "text", "last"),
              seed: int = 0) -> Probe:
    """An L1 logistic probe of ``right`` from the codes of ``pools`` side by side (``c``: inverse
    penalty; smaller keeps fewer features)."""
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise ProbeUnavailable("preset fit needs scikit-learn: pip install 'lmm-steer[fit]'") from None
    pools = [p for p in pools if p in codes]
    x = torch.cat([codes[p] for p in pools], dim=1)
    scale = x.abs().amax(0).clamp_min(1e-6)
    y = [int(r) for r in right]
    model = LogisticRegression(l1_ratio=1.0, C=c, solver="liblinear", class_weight="balanced", random_state=seed,
                               max_iter=2000)  # l1_ratio 1: the L1 penalty (scikit-learn 1.8's spelling)
    model.fit((x / scale).numpy(), y)
    coef = torch.from_numpy(model.coef_[0]).float() / scale  # weights per unit of activation
    width = codes[pools[0]].shape[1]
    weights = {p: {int(f): float(coef[i * width + f]) for f in torch.nonzero(coef[i * width:(i + 1) * width]).flatten()}
               for i, p in enumerate(pools)}
    accuracy = float(model.score((x / scale).numpy(), y))
    return Probe(weights, c, round(accuracy, 4), len(y), y.count(0))


C_PATH = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


def sparsest_probe(codes: dict[str, torch.Tensor], right: list[bool], min_features: int = 8, path=C_PATH,
                   pools=("image", "text", "last")) -> Probe:
    """The probe at the smallest penalty weight of ``path`` (the strongest penalty) that keeps at
    least ``min_features`` features; the last one's when none does. Few labelled examples need a
    weak penalty before any feature survives; many can afford a strong one."""
    probe = None
    for c in path:
        probe = fit_probe(codes, right, c, pools)
        if sum(len(w) for w in probe.weights.values()) >= min_features:
            break
    return probe
