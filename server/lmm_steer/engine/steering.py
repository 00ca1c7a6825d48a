"""What a request asks of the SAE, and the one function that applies it to hidden states.

Every edit of feature j becomes two coefficient pairs:

* delta semantics (default, error-preserving): ``h <- h + sum_j (a_j z_j(h) + b_j) W_dec[j]``
  clamp v: a=-1, b=v (target v);  add v: a=0, b=v (target z+v);  scale v: a=v-1, b=0 (target v z).
  transfer v from feature s: ``h <- h + v z_s(h) W_dec[j]``: feature j is written where s fires, in
  proportion to it (with s clamped at 0 beside it, the model reads j where it read s; no other
  position changes). A slot's z is its ``ids`` entry's and its direction its ``dirs`` entry's: the
  same feature, but for a transfer.
  Any delta edit may be gated by another feature g (``where``): its update is multiplied by
  ``1[z_g(h) > 0]``, so it acts only at positions where g fires (e.g. paint a shape only on the
  patches of the object whose colour names it), and nowhere else.
  Any delta edit may also be conditioned on the request (``when``, as conditional activation
  steering, CAST, conditions on the prompt): it acts on a request only if feature c fires at some
  position of its prompt in the unedited block output (e.g. steer colour only in prompts that ask
  about colour); decided once, at prefill, for every position of the request, decode steps too.
  ``when_on="text"`` reads the condition on the prompt's text alone (every position but the image's
  tokens), so a feature of a word ("hexagon") that also fires on a hexagon in the image decides by
  what the prompt says, not by what the picture holds.
  A feature may be edited by more than one slot when each slot has its own gate or condition
  (e.g. one per named object); where several of its slots act at once, their updates add up.
  With a=b=0 the update is exactly zero, so an unsteered row is bit-identical to the plain model.
* paper semantics (arXiv 2411.14982's code): the latent's pre-activation is rewritten,
  ``p_j <- c_j p_j + d_j`` (clamp: 0, v;  add: 1, v;  scale: v, 0), TopK is re-applied and the
  block output is *replaced* by the reconstruction, at every position, clamped or not.

A batch carries a fixed-width table per row (ids, a, b, c, d, and a paper flag), so one compiled
step serves any mix of requests; unused slots are no-ops (a=b=0; for paper, a repeat of a real
slot or c=1, d=0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

MODES = ("clamp", "add", "scale", "transfer")
SCOPES = ("all", "prompt", "generated", "image")
SEMANTICS = ("delta", "paper")
WHEN_ON = ("prompt", "text")  # where a ``when`` condition is read: the whole prompt, or its text alone


class SteeringError(ValueError):
    """Invalid steering input; ``field`` names the offending part of the request."""

    def __init__(self, message: str, field: str = "steering") -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class FeatureEdit:
    feature: int
    value: float
    mode: str = "clamp"
    source: int | None = None  # mode "transfer": the feature whose activation is written into this one
    where: int | None = None  # the edit acts only at positions where this feature fires
    when: int | None = None  # the edit acts on a request only if this feature fires somewhere in its prompt
    when_on: str = "prompt"  # where ``when`` is read: "prompt" (every position) or "text" (not the image's)

    @classmethod
    def of(cls, feature) -> FeatureEdit:
        """From a request's steering feature (anything with its fields: id, value, mode, source, where,
        when, when_on)."""
        return cls(feature.id, float(feature.value), feature.mode, feature.source, feature.where,
                   getattr(feature, "when", None), getattr(feature, "when_on", None) or "prompt")

    def record(self) -> dict:
        """The edit as a request's (or a preset's) steering feature, with only the fields it sets."""
        out = {"id": self.feature, "value": self.value, "mode": self.mode}
        out |= {k: getattr(self, k) for k in ("source", "where", "when") if getattr(self, k) is not None}
        return out | ({"when_on": self.when_on} if self.when_on != "prompt" else {})

    @property
    def slot_key(self) -> tuple:
        """What tells two edits of one feature apart: their gate and condition."""
        return self.where, self.when, self.when_on if self.when is not None else "prompt"


PLAIN_SLOT = (None, None, "prompt")  # the slot key of an edit with neither gate nor condition


def repeat_refused(keys: set[tuple], key: tuple) -> bool:
    """Whether an edit with slot ``key`` may not join the edits of its feature already given (their
    ``keys``): a feature is edited again only with another gate or condition, never beside (or as)
    an edit with neither."""
    return bool(keys) and (key in keys or PLAIN_SLOT in keys or key == PLAIN_SLOT)


@dataclass
class SteeringSpec:
    edits: list[FeatureEdit] = field(default_factory=list)
    scope: str | None = None  # None: "all" for delta semantics, "prompt" for paper (as the paper does)
    semantics: str = "delta"

    @property
    def effective_scope(self) -> str:
        return self.scope or ("prompt" if self.semantics == "paper" else "all")

    @property
    def active(self) -> bool:
        return bool(self.edits) or self.semantics == "paper"

    @property
    def conditional(self) -> bool:
        """Some edit acts only on prompts where its ``when`` feature fires."""
        return any(e.when is not None for e in self.edits)

    def validate(self, num_latents: int | None, max_edits: int, activation: str = "topk",
                 max_value: float = math.inf) -> None:
        """Raise SteeringError naming the field at fault. ``max_value`` bounds ``|value|``: the
        operator's limit, and never more than the steering table's dtype can hold (a value that
        becomes infinity there would turn the row's logits into NaN)."""
        if self.semantics not in SEMANTICS:
            raise SteeringError(f"semantics must be one of {SEMANTICS}, got {self.semantics!r}", "steering.semantics")
        if self.scope is not None and self.scope not in SCOPES:
            raise SteeringError(f"scope must be one of {SCOPES}, got {self.scope!r}", "steering.scope")
        if self.active and num_latents is None:
            raise SteeringError("no SAE is loaded, so there is nothing to steer with (give --sae)", "steering")
        if self.semantics == "paper" and activation != "topk":
            raise SteeringError(f"paper semantics re-applies TopK; this SAE is {activation}", "steering.semantics")
        if len(self.edits) > max_edits:
            raise SteeringError(
                f"{len(self.edits)} feature edits exceed the limit of {max_edits} per request", "steering.features"
            )
        seen: dict[int, set] = {}
        for i, e in enumerate(self.edits):
            where = f"steering.features[{i}]"
            if isinstance(e.feature, bool) or not isinstance(e.feature, int):
                raise SteeringError(f"feature id must be an integer, got {e.feature!r}", f"{where}.id")
            if not 0 <= e.feature < num_latents:
                raise SteeringError(
                    f"feature {e.feature} does not exist (the SAE has features 0..{num_latents - 1})", f"{where}.id"
                )
            keys = seen.setdefault(e.feature, set())
            if repeat_refused(keys, e.slot_key) or (keys and self.semantics == "paper"):
                raise SteeringError(f"feature {e.feature} is given more than once (a feature may be edited again "
                                    "only with another gate or condition, 'where' or 'when')", f"{where}.id")
            keys.add(e.slot_key)
            if isinstance(e.value, bool) or not isinstance(e.value, int | float) or not math.isfinite(e.value):
                raise SteeringError(f"value for feature {e.feature} must be a finite number, got {e.value!r}",
                                    f"{where}.value")
            if abs(e.value) > max_value:
                raise SteeringError(f"value {e.value!r} for feature {e.feature} is outside [-{max_value:g}, "
                                    f"{max_value:g}], the largest steering value this server takes",
                                    f"{where}.value")
            if e.mode not in MODES:
                raise SteeringError(f"mode must be one of {MODES}, got {e.mode!r}", f"{where}.mode")
            for name, kind in (("where", "a gated edit"), ("when", "a conditioned edit")):
                self._check_feature_ref(getattr(e, name), name, kind, num_latents, f"{where}.{name}")
            if e.when_on not in WHEN_ON:
                raise SteeringError(f"when_on must be one of {WHEN_ON}, got {e.when_on!r}", f"{where}.when_on")
            if e.when_on != "prompt" and e.when is None:
                raise SteeringError("when_on says where a 'when' condition is read; this edit has none",
                                    f"{where}.when_on")
            if e.mode != "transfer":
                if e.source is not None:
                    raise SteeringError(f"source is for mode 'transfer' only (feature {e.feature} is {e.mode!r})",
                                        f"{where}.source")
                continue
            if self.semantics == "paper":
                raise SteeringError("a transfer edits the block output (delta semantics); paper semantics rewrites "
                                    "pre-activations and has none", f"{where}.mode")
            if isinstance(e.source, bool) or not isinstance(e.source, int):
                raise SteeringError(f"mode 'transfer' needs a source feature id, got {e.source!r}", f"{where}.source")
            if not 0 <= e.source < num_latents or e.source == e.feature:
                raise SteeringError(f"source {e.source} must be another feature of the SAE (0..{num_latents - 1})",
                                    f"{where}.source")

    def _check_feature_ref(self, feature, name: str, kind: str, num_latents: int, field: str) -> None:
        """An edit's ``where`` or ``when``: absent, or a feature of the SAE under delta semantics."""
        if feature is None:
            return
        if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < num_latents:
            raise SteeringError(f"{name} must be a feature id of the SAE (0..{num_latents - 1}), got {feature!r}", field)
        if self.semantics == "paper":
            raise SteeringError(f"{kind} ('{name}') edits the block output (delta semantics); paper semantics "
                                "rewrites every position's pre-activations", field)


def delta_coefficients(edit: FeatureEdit) -> tuple[float, float]:
    v = float(edit.value)
    return {"clamp": (-1.0, v), "add": (0.0, v), "scale": (v - 1.0, 0.0), "transfer": (v, 0.0)}[edit.mode]


def paper_coefficients(edit: FeatureEdit) -> tuple[float, float]:
    v = float(edit.value)
    # a transfer is refused under paper semantics (validate); identity keeps a delta row's table whole
    return {"clamp": (0.0, v), "add": (1.0, v), "scale": (v, 0.0), "transfer": (1.0, 0.0)}[edit.mode]


@dataclass
class SteeringRow:
    """One request's table row, as Python lists of width ``len(edits)`` (padded when written);
    ``dirs``: each slot's decoder direction where it is not its ``ids`` entry (a transfer's);
    ``gates``: each slot's ``where`` feature, -1 for an ungated slot (None: no slot is gated);
    ``whens``: each slot's ``when`` feature, -1 for an unconditioned slot (None: none is conditioned),
    until the prefill decides them (``opened``), after which ``open`` says which slots act;
    ``when_text``: per slot, whether its condition is read on the prompt's text alone."""

    ids: list[int]
    delta_a: list[float]
    delta_b: list[float]
    paper_c: list[float]
    paper_d: list[float]
    paper: bool
    dirs: list[int] | None = None
    gates: list[int] | None = None
    whens: list[int] | None = None
    open: list[bool] | None = None
    when_text: list[bool] | None = None

    @classmethod
    def from_spec(cls, spec: SteeringSpec | None) -> SteeringRow:
        if spec is None or not spec.active:
            return cls([], [], [], [], [], False)
        edits = spec.edits
        dc = [delta_coefficients(e) for e in edits]
        pc = [paper_coefficients(e) for e in edits]
        paper = spec.semantics == "paper"
        zeros = [0.0] * len(edits)
        transfers = any(e.mode == "transfer" for e in edits)
        return cls(
            ids=[e.source if e.mode == "transfer" else e.feature for e in edits],
            delta_a=zeros if paper else [a for a, _ in dc],
            delta_b=zeros if paper else [b for _, b in dc],
            paper_c=[c for c, _ in pc],
            paper_d=[d for _, d in pc],
            paper=paper,
            dirs=[e.feature for e in edits] if transfers else None,
            gates=[-1 if e.where is None else e.where for e in edits] if any(e.where is not None for e in edits)
            else None,
            whens=[-1 if e.when is None else e.when for e in edits] if spec.conditional else None,
            when_text=text if any(text := [e.when is not None and e.when_on == "text" for e in edits]) else None,
        )

    @property
    def conditional(self) -> bool:
        """Some slot acts only if its ``when`` feature fires in the prompt, not yet decided."""
        return self.whens is not None

    def opened(self, fired: list[bool]) -> SteeringRow:
        """This row once the prompt is known: ``fired[i]``, whether slot i's ``when`` feature fired
        somewhere in it; a slot whose condition failed keeps its place with a zero update (a=b=0)."""
        keep = [w < 0 or f for w, f in zip(self.whens or [-1] * len(self.ids), fired, strict=True)]
        return replace(self, delta_a=[a if k else 0.0 for a, k in zip(self.delta_a, keep, strict=True)],
                       delta_b=[b if k else 0.0 for b, k in zip(self.delta_b, keep, strict=True)], whens=None, open=keep,
                       when_text=None)

    def decide(self, sae, h: torch.Tensor, is_text: torch.Tensor | None) -> SteeringRow:
        """This row opened on a prompt's unedited block output ``h [T, D]``: a slot whose ``when``
        feature (-1: none, counted as fired) is active at some position, or with ``when_text`` at
        some text position (``is_text [T]``: not an image token; None: every position is text)."""
        ids = torch.tensor([max(w, 0) for w in self.whens], dtype=torch.long, device=h.device)
        on_text = self.when_text is not None and is_text is not None
        whole, text = prompt_peaks(sae, h, ids, rows=is_text if on_text else None)
        text_slot = self.when_text if on_text else [False] * len(self.whens)
        peaks = [t if by_text else p for p, t, by_text in
                 zip(whole.tolist(), (text if on_text else whole).tolist(), text_slot, strict=True)]
        return self.opened([w < 0 or p > 0 for w, p in zip(self.whens, peaks, strict=True)])

    @property
    def gated(self) -> bool:
        return self.gates is not None and self.has_delta

    @property
    def needs_z(self) -> bool:
        return any(a != 0.0 for a in self.delta_a) or self.gated

    @property
    def has_delta(self) -> bool:
        # not through needs_z: gated asks has_delta, and a gated row whose conditions all failed
        # (every a and b zero) would ask back and forth for ever
        return any(b != 0.0 for b in self.delta_b) or any(a != 0.0 for a in self.delta_a)


class SteeringTable:
    """Fixed-shape tensors holding every row's edits; written on the host, read by the step."""

    def __init__(self, rows: int, width: int, device, dtype) -> None:
        self.width = width
        kw = {"device": device}
        self.ids = torch.zeros(rows, width, dtype=torch.long, **kw)
        self.delta_a = torch.zeros(rows, width, dtype=dtype, **kw)
        self.delta_b = torch.zeros(rows, width, dtype=dtype, **kw)
        self.paper_c = torch.ones(rows, width, dtype=dtype, **kw)
        self.paper_d = torch.zeros(rows, width, dtype=dtype, **kw)
        self.paper = torch.zeros(rows, dtype=torch.bool, **kw)
        self.dirs = torch.zeros(rows, width, dtype=torch.long, **kw)
        self.gates = torch.full((rows, width), -1, dtype=torch.long, **kw)

    def write(self, row: int, r: SteeringRow, in_scope: bool) -> None:
        """Write ``r`` into ``row``; out of scope, delta edits vanish and paper edits become identity
        (the reconstruction itself still replaces the block output)."""
        n = len(r.ids)
        w = self.width
        pad_id = r.ids[-1] if n else 0
        # Repeat the last real slot for paper padding: scatter of a duplicate id must write the same value.
        ids = r.ids + [pad_id] * (w - n)
        da = (r.delta_a if in_scope else [0.0] * n) + [0.0] * (w - n)
        db = (r.delta_b if in_scope else [0.0] * n) + [0.0] * (w - n)
        pc = r.paper_c if in_scope else [1.0] * n
        pd = r.paper_d if in_scope else [0.0] * n
        pc = pc + [pc[-1] if n else 1.0] * (w - n)
        pd = pd + [pd[-1] if n else 0.0] * (w - n)
        self.ids[row] = torch.tensor(ids, dtype=torch.long)
        self.delta_a[row] = torch.tensor(da, dtype=self.delta_a.dtype)
        self.delta_b[row] = torch.tensor(db, dtype=self.delta_b.dtype)
        self.paper_c[row] = torch.tensor(pc, dtype=self.paper_c.dtype)
        self.paper_d[row] = torch.tensor(pd, dtype=self.paper_d.dtype)
        self.paper[row] = r.paper
        self.dirs[row] = torch.tensor((r.dirs or r.ids) + [pad_id] * (w - n), dtype=torch.long)
        self.gates[row] = torch.tensor((r.gates or [-1] * n) + [-1] * (w - n), dtype=torch.long)

    def clear(self, row: int) -> None:
        self.write(row, SteeringRow([], [], [], [], [], False), True)


@dataclass(frozen=True)
class StepVariant:
    """Which parts of the SAE a step needs; each is a separately captured graph."""

    encode: bool  # some row needs z_j(h) (clamp / scale under delta semantics, or paper)
    delta: bool  # some row adds decoder directions
    paper: bool  # some row replaces h by the reconstruction
    measure: bool = False  # also report each edited feature's activation before and after the edit
    gate: bool = False  # some row's edits act only where another feature fires (``where``)

    @property
    def plain(self) -> bool:
        return not (self.encode or self.delta or self.paper)


PLAIN = StepVariant(False, False, False)


def variant_for(rows: list[tuple[SteeringRow, bool]], measure: bool = False) -> StepVariant:
    """The cheapest variant that computes every (row, in_scope) exactly; with ``measure``, one
    that also measures the edited features of every row that has edits (a second SAE encode)."""
    paper = any(r.paper for r, _ in rows)
    delta = any(r.has_delta and s for r, s in rows)
    encode = paper or any(r.needs_z and s for r, s in rows)
    gate = any(r.gated and s for r, s in rows)
    if measure and any(r.ids for r, _ in rows):
        return StepVariant(True, delta, paper, True, gate)
    return StepVariant(encode, delta, paper, gate=gate)


# Above this many [rows x edits x latents] comparisons, rank by a top-k threshold instead. Measured
# on an H200 with 131072 latents and 16 edits: counting wins at batch 1, top-k from batch 8 on.
_RANK_BY_COUNT_LIMIT = 1 << 22


def topk_member(pre: torch.Tensor, chosen: torch.Tensor, k: int,
                rank_by_count: bool | None = None) -> torch.Tensor:
    """``chosen`` where it is among the ``k`` largest of its row of ``pre``, else 0.

    Feature j is in the top k exactly when fewer than k latents exceed it, so a few clamped
    features need one comparison pass over the latents, not a top-k selection over all of them
    (cheaper on a GPU for a single row). Eagerly that pass materialises an ``[N, C, M]`` tensor, so
    large inputs use the k-th largest value as a threshold instead; ``rank_by_count`` overrides the
    choice (compiled code fuses the comparison into its sum, and the tensor never exists). Both
    agree except on exact ties at the threshold, where TopK itself picks arbitrarily.
    """
    zero = torch.zeros_like(chosen)
    if rank_by_count is None:
        rank_by_count = pre.shape[0] * chosen.shape[-1] * pre.shape[-1] <= _RANK_BY_COUNT_LIMIT
    if rank_by_count:
        above = (pre.unsqueeze(1) > chosen.unsqueeze(-1)).sum(-1)  # [N, C]
        return torch.where(above < k, chosen, zero)
    kth = torch.topk(pre, k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    return torch.where(chosen >= kth, chosen, zero)


def feature_activations(sae, x: torch.Tensor, ids: torch.Tensor, rank_by_count: bool | None = None):
    """``(pre, chosen, z)``: ReLU'd pre-activations ``[N, M]``, those of ``ids`` ``[N, C]``, and the
    SAE's activations of ``ids`` (TopK: the pre-activation where it is among the top k, else 0;
    ``rank_by_count`` as in :func:`topk_member`)."""
    pre = F.relu(sae.pre_activations(x))
    chosen, z = activations_of(sae, pre, ids, rank_by_count)
    return pre, chosen, z


def activations_of(sae, pre: torch.Tensor, ids: torch.Tensor, rank_by_count: bool | None = None):
    """``(chosen, z)`` of ``ids`` from the ReLU'd pre-activations ``pre``, as in :func:`feature_activations`."""
    chosen = pre.gather(-1, ids)
    act = sae.cfg.activation
    if act == "topk":
        z = topk_member(pre, chosen, sae.cfg.k, rank_by_count)
    elif act == "jumprelu":
        # chosen is relu(p), and relu(p) * (relu(p) > t) == relu(p) * (p > t) for every t
        z = chosen * (chosen > sae.threshold[ids])
    else:
        z = chosen
    return chosen, z


def prompt_peaks(sae, h: torch.Tensor, ids: torch.Tensor, rank_by_count: bool | None = None,
                 rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``([C], [C] or None)``: each feature of ``ids`` its largest SAE activation over the positions of
    ``h [T, D]`` (a prompt's unedited block output: positive where a ``when`` condition on it holds),
    and over the positions ``rows [T]`` marks alone (0 where it marks none), from one encode."""
    x = h.to(sae.W_dec.dtype)
    z = activations_of(sae, F.relu(sae.pre_activations(x)), ids.expand(x.shape[0], -1), rank_by_count)[1]
    if rows is None:
        return z.amax(0), None
    return z.amax(0), (z[rows].amax(0) if bool(rows.any()) else z.new_zeros(z.shape[1]))


def apply_steering(h: torch.Tensor, sae, ids, delta_a, delta_b, paper_c, paper_d, paper, variant: StepVariant,
                   effect: torch.Tensor | None = None, rank_by_count: bool | None = None, dirs=None, gates=None):
    """Steer hidden states ``h [N, D]`` with per-row tables ``[N, C]`` (``paper [N]``); ``dirs``:
    each slot's decoder direction (default ``ids``; a transfer's differs); ``gates``: each slot's
    ``where`` feature or -1 (read only by a ``variant.gate`` step).

    With ``variant.measure``, ``effect [2, N, C]`` receives the SAE's activation of each table
    feature in the block output before the edit and in the edited output (exact: a second encode).
    ``rank_by_count`` as in :func:`topk_member`. Pure tensor code with static shapes and no host
    synchronisation, so it runs inside a captured CUDA graph.
    """
    if variant.plain:
        return h
    w_dec = sae.W_dec
    x = h.to(w_dec.dtype)
    if variant.encode:
        pre, chosen, z = feature_activations(sae, x, ids, rank_by_count)
        coef = delta_a * z + delta_b
        if variant.gate:  # a gated slot acts only where its gate feature is active
            open_ = (gates < 0) | (activations_of(sae, pre, gates.clamp(min=0), rank_by_count)[1] > 0)
            coef = coef * open_.to(coef.dtype)
    else:
        coef = delta_b
    out = h
    if variant.delta:
        delta = F.embedding_bag(ids if dirs is None else dirs, w_dec, per_sample_weights=coef.to(w_dec.dtype), mode="sum")
        out = h + delta.to(h.dtype)
    if variant.paper:
        edited = pre.scatter(-1, ids, paper_c * chosen + paper_d)
        vals, idx = torch.topk(F.relu(edited), sae.cfg.k, dim=-1, sorted=False)
        recon = F.embedding_bag(idx, w_dec, per_sample_weights=vals, mode="sum") + sae.b_dec
        out = torch.where(paper.unsqueeze(-1), recon.to(h.dtype), out)
    if variant.measure:
        effect[0].copy_(z)
        effect[1].copy_(feature_activations(sae, out.to(w_dec.dtype), ids, rank_by_count)[2])
    return out
