"""Sign descent with schedule-free averaging: sparsify's default SAE optimiser (its ``signum``:
schedulefree's ``ScheduleFreeWrapper`` around sign SGD, momentum 0.95), written out here so that
training needs no package beyond torch. Defazio et al., "The Road Less Scheduled" (2024):

    y_t = (1 - b) z_t + b x_t            gradients are taken at y (the parameters hold y)
    z_{t+1} = z_t - lr sign(g(y_t))      the base step, on z
    x_{t+1} = (1 - c) x_t + c z_{t+1}    x: z averaged with weights lr_max^2 (c = weight / sum)

x is what the trained model is (evaluate and save it); it is not stored but recovered from y and
z, as schedulefree does: x = (y - (1 - b) z) / b. A test checks the iterates against schedulefree
itself when it is installed (equal up to rounding: the update is fused).
"""

from __future__ import annotations

import contextlib

import torch


class ScheduleFreeSign:
    def __init__(self, params: list[torch.Tensor], lr: float, momentum: float = 0.95) -> None:
        self.params, self.lr, self.momentum = params, lr, momentum
        self.z: list[torch.Tensor] = []  # taken at the first step, after any data-dependent initialisation
        self.weight_sum = 0.0
        self.lr_max = 0.0

    @torch.no_grad()
    def step(self) -> None:
        b = self.momentum
        if not self.z:
            self.z = [p.detach().clone() for p in self.params]
        self.lr_max = max(self.lr_max, self.lr)
        weight = self.lr_max**2
        self.weight_sum += weight
        c = weight / self.weight_sum
        # y' = b x' + (1 - b) z' with x = (y - (1 - b) z) / b, x' = (1 - c) x + c z' and
        # z = z' + lr s reduces to y' = (1 - c) y + c z' - (1 - c)(1 - b) lr s: two passes over
        # each parameter instead of four (the three lerps schedulefree runs, and the step)
        for p, z in zip(self.params, self.z, strict=True):
            s = p.grad.sign()
            z.add_(s, alpha=-self.lr)
            p.lerp_(z, c)
            p.add_(s, alpha=-(1 - c) * (1 - b) * self.lr)

    @contextlib.contextmanager
    @torch.no_grad()
    def averaged(self):
        """The parameters hold x (the averaged iterate) inside the block, y again after it."""
        if not self.z:  # before the first step x = y
            yield
            return
        ys = [p.detach().clone() for p in self.params]
        for p, z in zip(self.params, self.z, strict=True):
            p.lerp_(z, 1 - 1 / self.momentum)
        try:
            yield
        finally:
            for p, y in zip(self.params, ys, strict=True):
                p.copy_(y)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"z.{i}": z for i, z in enumerate(self.z)} | {
            "weight_sum": torch.tensor(self.weight_sum, dtype=torch.float64),
            "lr_max": torch.tensor(self.lr_max, dtype=torch.float64)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.z = [tensors[f"z.{i}"].clone() for i in range(len(self.params))]
        self.weight_sum = float(tensors["weight_sum"])
        self.lr_max = float(tensors["lr_max"])
