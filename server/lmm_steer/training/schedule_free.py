"""Sign descent with schedule-free averaging: sparsify's default SAE optimiser (its ``signum``:
schedulefree's ``ScheduleFreeWrapper`` around sign SGD, momentum 0.95), written out here so that
training needs no package beyond torch. Defazio et al., "The Road Less Scheduled" (2024):

    y_t = (1 - b) z_t + b x_t            gradients are taken at y (the parameters hold y)
    z_{t+1} = z_t - lr sign(g(y_t))      the base step, on z
    x_{t+1} = (1 - c) x_t + c z_{t+1}    x: z averaged with weights lr_max^2 (c = weight / sum)

schedulefree evaluates and saves x, recovered from y and z (x = (y - (1 - b) z) / b). We keep y:
the decoder's unit-norm constraint holds at y, while x averages rows that rotate during training
and they shrink (mean norm 0.69 after the shipped SAE's recipe). On those activations y
reconstructs with FVU 0.114, x with 0.198 (experiments/sae-training.md), so x is never formed. A test
checks the iterates against schedulefree itself (equal up to rounding: the update is fused).
"""

from __future__ import annotations

import torch

SLAB = 1 << 19  # elements per slab of a CPU step: three 2 MiB fp32 slabs stay in cache between passes


class ScheduleFreeSign:
    """The optimiser surface the trainer uses for torch's Adam too: ``param_groups[0]["lr"]``,
    ``step()``, ``state_dict()`` / ``load_state_dict()`` (per-parameter tensors)."""

    def __init__(self, params: list[torch.Tensor], lr: float, momentum: float = 0.95,
                 slab: int | None = SLAB) -> None:
        self.params, self.momentum, self.slab = params, momentum, slab
        self.param_groups = [{"lr": lr}]
        self.z: list[torch.Tensor] = []  # taken at the first step, after any data-dependent initialisation
        self.weight_sum = 0.0
        self.lr_max = 0.0

    @torch.no_grad()
    def step(self) -> None:
        b, lr = self.momentum, self.param_groups[0]["lr"]
        if not self.z:
            self.z = [p.detach().clone() for p in self.params]
        self.lr_max = max(self.lr_max, lr)
        weight = self.lr_max**2
        self.weight_sum += weight
        c = weight / self.weight_sum
        # y' = b x' + (1 - b) z' with x = (y - (1 - b) z) / b, x' = (1 - c) x + c z' and
        # z = z' + lr s reduces to y' = (1 - c) y + c z' - (1 - c)(1 - b) lr s: three in-place
        # updates after the sign, where schedulefree runs three lerps and the base step
        for p, z in zip(self.params, self.z, strict=True):
            # the sign overwrites the gradient (the trainer rewrites it every step), so no temporary;
            # on a CPU, slab by slab, so the updates after the sign read from cache, not memory
            # (on [32768, 1024]: 1.5x faster than whole tensors with the sign in place, 3.2x than a fresh sign tensor)
            n = self.slab if self.slab and p.device.type == "cpu" else p.numel()
            flat_p, flat_z, flat_s = p.view(-1), z.view(-1), p.grad.view(-1)
            for i in range(0, p.numel(), n):
                ps, zs, ss = flat_p[i:i + n], flat_z[i:i + n], flat_s[i:i + n]
                torch.sign(ss, out=ss)
                zs.add_(ss, alpha=-lr)
                ps.lerp_(zs, c)
                ps.add_(ss, alpha=-(1 - c) * (1 - b) * lr)

    def state_dict(self) -> dict:
        if not self.z:
            return {"state": {}}
        # the two scalars are the group's; every parameter's entry repeats them (as torch's 'step'),
        # each its own tensor since safetensors refuses shared storage
        return {"state": {i: {"z": z, "weight_sum": torch.tensor(self.weight_sum, dtype=torch.float64),
                              "lr_max": torch.tensor(self.lr_max, dtype=torch.float64)}
                          for i, z in enumerate(self.z)}}

    def load_state_dict(self, state: dict) -> None:
        per = state["state"]
        if not per:
            return
        self.z = [per[i]["z"].clone() for i in range(len(self.params))]
        self.weight_sum, self.lr_max = float(per[0]["weight_sum"]), float(per[0]["lr_max"])
