"""Calibrate each feature's steering strength: where its concept starts to show, where the text
stops being fluent, and the value between them to steer with.

For every feature, the server's own engine generates a few greedy tokens after each of a few
neutral prompts with the feature clamped at several multiples of its largest activation (scope
``generated``, so every request of a prompt shares one prefill). Each output is judged offline:

* concept gain: cosine similarity (all-MiniLM-L6-v2) of the output with the feature's text
  (explanation, else the words it fires on and its contexts), minus that of the unsteered output;
* fluency: the unsteered model's mean log-probability per token of the output, after the plain
  prompt; and whether the output is degenerate (``eval.measures.degenerate``).

onset: the smallest multiple whose mean gain reaches ``onset_gain``. limit: the smallest multiple
where half the outputs or more are degenerate or fluency falls ``fluency_drop`` nats below the
unsteered outputs'. value: the largest multiple at or above onset and below limit (none when the
concept never shows before the text breaks). Stored per feature as ``steer`` in the catalog row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..engine import FeatureEdit, GenerationRequest, SamplingParams, SteeringSpec
from ..eval.measures import degenerate

NEUTRAL_PROMPTS = ("Write a few sentences.", "Tell me something interesting.")


@dataclass
class CalibrationConfig:
    multiples: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0)
    prompts: tuple[str, ...] = NEUTRAL_PROMPTS
    tokens: int = 12
    batch: int = 64
    onset_gain: float = 0.05
    fluency_drop: float = 2.5


def _cache_argument(model) -> str:
    # transformers renamed the forward argument past_key_values to cache (5.2x); both are in use
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def completion_logprobs(loaded, prompts: list[str], completions: list[list[int]], batch: int = 64) -> list[float]:
    """Mean log-probability per token of each completion under the plain model, after its chat
    prompt (teacher forcing). Completions of one prompt and one length run together on that
    prompt's keys and values, computed once: only completion positions pass through the model."""
    from ..models.inputs import build_inputs

    model = loaded.model
    device = model.get_output_embeddings().weight.device
    groups: dict[tuple[str, int], list[int]] = {}
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        groups.setdefault((p, len(c)), []).append(i)
    out = [0.0] * len(prompts)
    for (prompt, length), members in groups.items():
        if length == 0:
            continue
        prompt_ids = build_inputs(loaded, [{"role": "user", "content": prompt}])["input_ids"].to(device)
        for start in range(0, len(members), batch):
            rows = members[start:start + batch]
            ids = torch.tensor([completions[i] for i in rows], dtype=torch.long, device=device)
            with torch.inference_mode():
                first = model(input_ids=prompt_ids, use_cache=True)
                cache = getattr(first, "cache", None) or first.past_key_values
                cache.batch_repeat_interleave(len(rows))
                rest = model(input_ids=ids, use_cache=True, **{_cache_argument(model): cache}).logits.float()
                logits = torch.cat([first.logits[:, -1:].float().expand(len(rows), 1, -1), rest[:, :-1]], dim=1)
                logp = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]
            for i, value in zip(rows, logp.mean(-1).tolist(), strict=True):
                out[i] = value
    return out


def _generate(engine, prompts, edits, cfg: CalibrationConfig):
    reqs = [GenerationRequest(messages=[{"role": "user", "content": p}],
                              steering=SteeringSpec([e], scope="generated") if e else None,
                              sampling=SamplingParams(max_tokens=cfg.tokens, ignore_eos=True))
            for p, e in zip(prompts, edits, strict=True)]
    return engine.generate(reqs)


def summarise_feature(multiples, gains, fluencies, degenerate_shares, base_fluency, max_activation,
                      cfg: CalibrationConfig) -> dict:
    """The calibration record of one feature from its per-multiple measurements (pure arithmetic)."""
    onset = next((m for m, g in zip(multiples, gains, strict=True) if g >= cfg.onset_gain), None)
    limit = next((m for m, f, d in zip(multiples, fluencies, degenerate_shares, strict=True)
                  if d >= 0.5 or f < base_fluency - cfg.fluency_drop), None)
    usable = [m for m in multiples if onset is not None and m >= onset and (limit is None or m < limit)]
    scale = float(max_activation)
    return {
        "onset": round(onset * scale, 4) if onset is not None else None,
        "limit": round(limit * scale, 4) if limit is not None else None,
        "value": round(max(usable) * scale, 4) if usable else None,
        "multiples": list(multiples), "gain": [round(g, 4) for g in gains],
        "fluency": [round(f, 4) for f in fluencies], "degenerate": [round(d, 4) for d in degenerate_shares],
        "base_fluency": round(base_fluency, 4),
    }


def calibrate(engine, catalog, index, features: list[int], cfg: CalibrationConfig, progress=None) -> dict[int, dict]:
    """``{feature: steer record}`` for ``features`` (see the module docstring)."""
    prompts = list(cfg.prompts)
    base = _generate(engine, prompts, [None] * len(prompts), cfg)
    base_texts = [r.text for r in base]
    base_vecs = index.embedder.encode(base_texts)
    base_fluency = sum(completion_logprobs(engine.loaded, prompts, [r.token_ids for r in base])) / len(prompts)
    jobs = [(f, m, p) for f in features for m in cfg.multiples for p in range(len(prompts))]
    results: dict[tuple, tuple] = {}
    t0 = time.perf_counter()
    for start in range(0, len(jobs), cfg.batch):
        chunk = jobs[start:start + cfg.batch]
        edits = [FeatureEdit(f, m * float(catalog.get(f).extras.get("max_activation") or 1.0)) for f, m, _ in chunk]
        outs = _generate(engine, [prompts[p] for _, _, p in chunk], edits, cfg)
        vecs = index.embedder.encode([o.text for o in outs])
        fluency = completion_logprobs(engine.loaded, [prompts[p] for _, _, p in chunk], [o.token_ids for o in outs])
        for (f, m, p), o, v, fl in zip(chunk, outs, vecs, fluency, strict=True):
            fvec = index.vectors[index.row[f]]
            gain = float(v @ fvec) - float(base_vecs[p] @ fvec)
            results[(f, m, p)] = (gain, fl, degenerate(o.text))
        if progress:
            progress(min(start + cfg.batch, len(jobs)), len(jobs), time.perf_counter() - t0)
    records = {}
    n = len(prompts)
    for f in features:
        per = [[results[(f, m, p)] for p in range(n)] for m in cfg.multiples]
        records[f] = summarise_feature(
            cfg.multiples, [sum(r[0] for r in rs) / n for rs in per], [sum(r[1] for r in rs) / n for rs in per],
            [sum(r[2] for r in rs) / n for rs in per], base_fluency,
            catalog.get(f).extras.get("max_activation") or 1.0, cfg)
    return records
