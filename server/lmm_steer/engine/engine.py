"""The steering engine: continuous batching over a static KV cache, SAE edits per row.

Requests join between decode steps (their prefill runs eagerly, one at a time) and leave when they
finish; each decode step advances every active row by one token. A row carries its own position,
its own row of the steering table and its own sampling state, so its tokens do not depend on
which other rows share the batch. Nothing here knows about HTTP.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..models.inputs import build_inputs
from ..models.loaded import LoadedModel
from .decode_step import NON_FINITE, CUDAGraphDecoder, DecodeStep
from .hookpoint import language_model, resolve_layer_index
from .kv_cache import StaticKVCache
from .prefill import run_prefill
from .sampling import SamplingParams, make_generator, sample_batch, sample_row
from .steering import SteeringRow, SteeringSpec, delta_coefficients, variant_for


class EngineError(ValueError):
    """A request the engine cannot take; ``field`` names the part of the request at fault."""

    def __init__(self, message: str, field: str = "request") -> None:
        super().__init__(message)
        self.field = field


@dataclass
class EngineConfig:
    max_batch: int = 8
    max_seq_len: int | None = None  # per sequence; default: what the KV budget allows
    kv_cache_bytes: int | None = None  # default: 1 GiB on CPU, 30% of free memory on CUDA
    max_clamps: int = 32
    # largest |value| a steering edit may carry; far past any useful strength (decoder directions
    # have unit norm, residual streams norms of tens to hundreds), far below float overflow
    max_steer_value: float = 1e4
    cuda_graphs: bool = True
    # torch.compile each decoder block's decode work (fuses norms, rotary and activations) and the
    # steering edit (fuses the top-k membership count); the first steps of each new shape compile
    # for seconds to minutes. Off by default.
    compile: bool = False
    min_length_bucket: int = 128
    # every N-th decode step with edited features also measures them (one more SAE encode); 0: never
    clamp_effect_every: int = 0
    # prompt tokens whose unsteered prefill (keys, values, last logits) is kept for the next request
    # with the same text-only prompt whose steering leaves the prompt alone (scope "generated", or
    # none): sweeps, calibration and return_unsteered twins prefill once. 0 turns it off.
    prefill_cache_tokens: int = 2048


@dataclass
class GenerationRequest:
    messages: list[dict] | None = None  # chat messages; image parts are {"type": "image"}
    images: list = field(default_factory=list)  # PIL images, in placeholder order
    prompt_ids: list[int] | None = None  # raw token ids instead of messages (benchmarks, tests)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    steering: SteeringSpec | None = None
    request_id: str | None = None


@dataclass
class TokenEvent:
    request_id: str
    token_id: int
    text_delta: str
    finished: bool = False
    finish_reason: str | None = None
    logprob: float | None = None


@dataclass
class GenerationResult:
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    logprobs: list[float] | None = None
    timings: dict = field(default_factory=dict)
    steered_features: list[int] = field(default_factory=list)  # the features this request edited
    # edits conditioned on the prompt (``when``) whose condition failed: they changed nothing
    idle_features: list[int] = field(default_factory=list)
    idle_edits: list[int] = field(default_factory=list)  # the same, as indices into the request's edits


@dataclass(frozen=True)
class ClampEffect:
    """One edited feature of one request at one generated token, from a measuring step: the SAE's
    activation of the feature in the hook block's output before the edit and after it, and the
    activation the edit aims at (the natural one where the edit is out of scope)."""

    feature: int
    mode: str
    before: float
    after: float
    target: float


class RowFailure(NamedTuple):
    """A request the engine ended with an error; the others in its batch carry on."""

    request_id: str
    message: str
    code: str = "internal_error"  # or NON_FINITE_CODE: this request's logits became NaN or infinite


NON_FINITE_CODE = "non_finite_output"


class NonFiniteOutput(RuntimeError):
    pass


def _non_finite_message(seq: _Sequence) -> str:
    steered = seq.req.steering is not None and seq.req.steering.active
    why = ("; the steering values are likely too large for this model's dtype" if steered else "")
    return (f"the model's output became non-finite (NaN or infinite logits) at generated token "
            f"{len(seq.generated) + 1}{why}")


@dataclass
class StepOutput:
    events: list[TokenEvent]
    finished: list[GenerationResult]
    failed: list[RowFailure]
    clamp_effects: list[ClampEffect] = field(default_factory=list)


@dataclass
class _Sequence:
    req: GenerationRequest
    inputs: dict
    steering_row: SteeringRow
    generator: torch.Generator
    row: int = -1
    length: int = 0  # tokens in the KV cache
    rope_pos: int = 0
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    prefix_offset: int = 0  # detokenisation window: text of generated[prefix_offset:read_offset] is final
    read_offset: int = 0
    stream: object | None = None  # tokenizers' DecodeStream, where the tokenizer has a Rust backend
    finish_reason: str | None = None
    t_submit: float = 0.0
    t_start: float = 0.0  # prefill began
    t_first: float | None = None

    @property
    def prompt_len(self) -> int:
        return int(self.inputs["input_ids"].shape[1])

    @property
    def decode_in_scope(self) -> bool:
        spec = self.req.steering
        return spec is not None and spec.effective_scope in ("all", "generated")


def _clamp_effects(seqs: list[_Sequence], effect: torch.Tensor) -> list[ClampEffect]:
    """The measured ``effect [2, rows, width]`` of each sequence's edits, with their targets."""
    found = []
    for i, s in enumerate(seqs):
        spec = s.req.steering
        if spec is None:
            continue
        in_scope = s.decode_in_scope
        acts = s.steering_row.open or [True] * len(spec.edits)
        for j, e in enumerate(spec.edits):
            # a transfer's slot measures the source and aims at no value of its own; a gated edit aims
            # at its target only where its gate fires, which this measure does not read
            if e.mode == "transfer" or e.where is not None:
                continue
            before, after = float(effect[0, i, j]), float(effect[1, i, j])
            # the edit adds a z + b along the feature's direction: it aims at z + a z + b
            a, b = delta_coefficients(e) if in_scope and acts[j] else (0.0, 0.0)
            found.append(ClampEffect(e.feature, e.mode, before, after, before + a * before + b))
    return found


def _longest_token_chars(tokenizer) -> int:
    try:
        vocab = tokenizer.get_vocab()
    except (AttributeError, NotImplementedError):
        return 64  # no vocabulary to read: a generous bound on any real tokenizer's longest entry
    return max((len(t) for t in vocab), default=1)


def _text_chars(messages: list[dict]) -> int:
    total = 0
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p.get("text") or "") for p in content if isinstance(p, dict))
    return total


def _buckets(limit: int, start: int = 1) -> list[int]:
    out, b = [], start
    while b < limit:
        out.append(b)
        b *= 2
    return [*out, limit]


class Engine:
    def __init__(self, loaded: LoadedModel, sae=None, hookpoint: str | None = None,
                 config: EngineConfig | None = None) -> None:
        self.loaded, self.model, self.sae = loaded, loaded.model, sae
        self.config = cfg = config or EngineConfig()
        decoder = language_model(self.model)
        text_cfg = decoder.config
        if sae is not None:
            if hookpoint is None:
                raise EngineError("an SAE needs a hookpoint (model.layers.<i>)", "hookpoint")
            if sae.d_in != text_cfg.hidden_size:
                raise EngineError(
                    f"SAE d_in={sae.d_in} does not match the model's hidden size {text_cfg.hidden_size}", "sae"
                )
        self.hook_index = resolve_layer_index(self.model, hookpoint) if hookpoint else -1
        self.hookpoint = hookpoint
        weight = self.model.get_output_embeddings().weight
        self.device, self.dtype = weight.device, weight.dtype
        layers = len(decoder.layers)
        attn = decoder.layers[0].self_attn
        kv_heads = text_cfg.num_key_value_heads
        head_dim = attn.head_dim
        per_token = StaticKVCache.bytes_per_token(layers, kv_heads, head_dim, self.dtype)
        budget = cfg.kv_cache_bytes or self._default_kv_budget()
        max_len = budget // (per_token * cfg.max_batch)
        max_len = min(max_len, getattr(text_cfg, "max_position_embeddings", max_len))
        if cfg.max_seq_len:
            max_len = min(max_len, cfg.max_seq_len)
        max_len -= max_len % 16
        if max_len < 16:
            raise EngineError(
                f"KV cache budget of {budget} bytes holds fewer than 16 tokens per sequence at max_batch "
                f"{cfg.max_batch} ({per_token} bytes per token)", "kv_cache_bytes"
            )
        self.max_len = max_len
        self.cache = StaticKVCache(layers, cfg.max_batch, kv_heads, max_len, head_dim, dtype=self.dtype,
                                   device=self.device)
        self.step_fn = DecodeStep(self.model, sae, self.hook_index, self.cache, max(1, cfg.max_clamps),
                                  compiled=cfg.compile)
        self.max_steer_value = min(cfg.max_steer_value, torch.finfo(self.step_fn.table.delta_b.dtype).max)
        self.use_graphs = cfg.cuda_graphs and self.device.type == "cuda"
        self.graphs = CUDAGraphDecoder(self.step_fn) if self.use_graphs else None
        self.batch_buckets = _buckets(cfg.max_batch)
        self.length_buckets = _buckets(max_len, cfg.min_length_bucket) if max_len > cfg.min_length_bucket else [
            max_len]
        self.eos_ids = self._eos_ids()
        # No token covers more characters than the longest vocabulary entry (byte-level entries
        # hold a character per byte), so text beyond max_len of them cannot fit: refuse it by its
        # length, before the tokenizer spends seconds and gigabytes on it. The factor 2 covers
        # normalisers that merge characters (NFKC folds a letter and its combining accent).
        self.max_prompt_chars = 2 * max_len * _longest_token_chars(loaded.tokenizer)
        self.waiting: deque[_Sequence] = deque()
        self.active: list[_Sequence] = []
        self._ids = itertools.count()
        self._inputs_stale, self._last_bucket = True, 0  # device-side step inputs need a rewrite
        self._prefills: OrderedDict[tuple, object] = OrderedDict()  # LRU of unsteered prefills
        self.stats = {"decode_steps": 0, "graph_replays": 0, "eager_steps": 0, "prefills": 0, "prefill_reuses": 0,
                      "decode_tokens": 0, "decode_time_s": 0.0, "prefill_time_s": 0.0}

    # -- setup helpers ----------------------------------------------------------------------

    def _default_kv_budget(self) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(0.3 * free)
        return 1 << 30

    def _eos_ids(self) -> set[int]:
        ids = set()
        for src in (getattr(self.model, "generation_config", None), self.model.config,
                    getattr(self.model.config, "text_config", None)):
            value = getattr(src, "eos_token_id", None) if src is not None else None
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list | tuple):
                ids.update(v for v in value if isinstance(v, int))
        tok_eos = getattr(self.loaded.tokenizer, "eos_token_id", None)
        if isinstance(tok_eos, int):
            ids.add(tok_eos)
        return ids

    # -- requests ---------------------------------------------------------------------------

    def prepare(self, req: GenerationRequest) -> _Sequence:
        """Validate and tokenise a request (no model work); raises EngineError naming the field."""
        from .sampling import SamplingError
        from .steering import SteeringError

        try:
            req.sampling.validate()
        except SamplingError as e:
            raise EngineError(str(e), e.field) from None
        if req.steering is not None:
            try:
                req.steering.validate(
                    self.sae.num_latents if self.sae is not None else None, self.config.max_clamps,
                    self.sae.cfg.activation if self.sae is not None else "topk", self.max_steer_value,
                )
            except SteeringError as e:
                raise EngineError(str(e), e.field) from None
        if req.prompt_ids is not None:
            if not req.prompt_ids:
                raise EngineError("prompt is empty", "prompt_ids")
            inputs = {"input_ids": torch.tensor([req.prompt_ids], dtype=torch.long)}
        else:
            if not req.messages:
                raise EngineError("messages must not be empty", "messages")
            chars = _text_chars(req.messages)
            if chars > self.max_prompt_chars:
                raise EngineError(
                    f"prompt of {chars} characters cannot fit this engine's context of {self.max_len} tokens "
                    f"(at most {self.max_prompt_chars} characters are tokenised)", "messages")
            try:
                inputs = build_inputs(self.loaded, req.messages, req.images or None)
            except ValueError as e:
                raise EngineError(f"cannot build the prompt: {e}", "messages") from None
        inputs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        prompt_len = int(inputs["input_ids"].shape[1])
        if prompt_len >= self.max_len:
            raise EngineError(
                f"prompt of {prompt_len} tokens exceeds this engine's context of {self.max_len} tokens",
                "messages" if req.prompt_ids is None else "prompt_ids",
            )
        need = prompt_len + req.sampling.max_tokens
        if need > self.max_len:
            raise EngineError(
                f"prompt of {prompt_len} tokens plus max_tokens {req.sampling.max_tokens} needs {need} positions; "
                f"this engine holds at most {self.max_len} per sequence", "max_tokens"
            )
        rid = req.request_id or f"req-{next(self._ids)}"
        req.request_id = rid
        return _Sequence(req, inputs, SteeringRow.from_spec(req.steering),
                         make_generator(req.sampling.seed, self.device), t_submit=time.perf_counter())

    def submit(self, req: GenerationRequest) -> str:
        return self.enqueue(self.prepare(req))

    def enqueue(self, seq: _Sequence) -> str:
        """Queue a prepared request; safe to call from another thread than the one stepping."""
        self.waiting.append(seq)
        return seq.req.request_id

    def abort(self, request_id: str) -> bool:
        """Drop a request, waiting or running (its row is free for the next step)."""
        for seq in list(self.waiting):
            if seq.req.request_id == request_id:
                self.waiting.remove(seq)
                return True
        for seq in self.active:
            if seq.req.request_id == request_id:
                self._release(seq)
                return True
        return False

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.active)

    # -- the loop ---------------------------------------------------------------------------

    def step(self) -> StepOutput:
        """Admit waiting requests into free rows (prefill), then one decode step for all rows.

        A failure while admitting one request fails that request only; a failure of the batched
        decode step fails the requests in that batch. The engine stays usable either way."""
        out = StepOutput([], [], [])
        while self.waiting and len(self.active) < self.config.max_batch:
            seq = self.waiting.popleft()
            t0 = time.perf_counter()
            try:
                self._admit(seq, out.events, out.finished)
            except NonFiniteOutput as e:
                self._fail(seq, RowFailure(seq.req.request_id, str(e), NON_FINITE_CODE), out)
            except Exception as e:  # noqa: BLE001 - reported to the caller of this one request
                self._fail(seq, RowFailure(seq.req.request_id, f"{type(e).__name__}: {e}"), out)
            self.stats["prefill_time_s"] += time.perf_counter() - t0
        if self.active:
            t0 = time.perf_counter()
            n = len(self.active)
            try:
                self._decode(out)  # ends with a device sync: tokens are read back
            except Exception as e:  # noqa: BLE001
                for seq in list(self.active):
                    self._fail(seq, RowFailure(seq.req.request_id, f"{type(e).__name__}: {e}"), out)
            self.stats["decode_tokens"] += n
            self.stats["decode_time_s"] += time.perf_counter() - t0
        return out

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Run ``requests`` to completion; results in the order given."""
        order = [self.submit(r) for r in requests]
        results: dict[str, GenerationResult] = {}
        while self.has_work:
            out = self.step()
            if out.failed:
                raise RuntimeError(f"request {out.failed[0][0]} failed: {out.failed[0][1]}")
            for r in out.finished:
                results[r.request_id] = r
        return [results[rid] for rid in order]

    def _admit(self, seq: _Sequence, events, done) -> None:
        seq.t_start = time.perf_counter()
        pre = self._prefill(seq)
        if pre.steering_row is not None:  # its ``when`` conditions, decided on the prompt, hold for every step
            seq.steering_row = pre.steering_row
        seq.row = len(self.active)
        self.cache.load(seq.row, pre.keys, pre.values)
        seq.length, seq.rope_pos = pre.length, pre.next_rope_pos
        seq.t_first = time.perf_counter()
        self.active.append(seq)
        self._write_row(seq)
        if not bool(torch.isfinite(pre.logits).all()):
            raise NonFiniteOutput(_non_finite_message(seq))
        token = sample_batch(pre.logits[None], [seq.req.sampling], [seq.generator])[0]
        self._accept(seq, token, pre.logits, events, done)

    def _prefill(self, seq: _Sequence):
        spec = seq.req.steering
        untouched = spec is None or not spec.active or (spec.semantics == "delta" and spec.effective_scope == "generated"
                                                        and not seq.steering_row.conditional)
        budget = self.config.prefill_cache_tokens
        key = None
        if untouched and budget and set(seq.inputs) <= {"input_ids", "attention_mask"} and seq.prompt_len <= budget:
            key = tuple(seq.inputs["input_ids"][0].tolist())
            cached = self._prefills.get(key)
            if cached is not None:
                self._prefills.move_to_end(key)
                self.stats["prefill_reuses"] += 1
                return cached  # read-only: the cache load copies it, sampling only reads the logits
        pre = run_prefill(
            self.model, seq.inputs, sae=self.sae, hook_index=self.hook_index, row=seq.steering_row,
            scope=spec.effective_scope if spec else "all", table_width=self.config.max_clamps,
        )
        self.stats["prefills"] += 1
        if key is not None:
            self._prefills[key] = pre
            while sum(len(k) for k in self._prefills) > budget:
                self._prefills.popitem(last=False)
        return pre

    def _write_row(self, seq: _Sequence) -> None:
        self.step_fn.table.write(seq.row, seq.steering_row, seq.decode_in_scope)
        self._inputs_stale = True

    def _decode(self, out: StepOutput) -> None:
        events, done = out.events, out.finished
        n = len(self.active)
        b = next(x for x in self.batch_buckets if x >= n)
        longest = max(s.length for s in self.active) + 1
        attend = next(x for x in self.length_buckets if x >= longest)
        fn = self.step_fn
        if self._inputs_stale or b != self._last_bucket:
            pad = [0] * (b - n)
            # one host->device copy per buffer; rows beyond n are padding with cleared steering rows
            fn.tokens[:b].copy_(torch.tensor([s.generated[-1] for s in self.active] + pad))
            fn.write_pos[:b].copy_(torch.tensor([s.length for s in self.active] + pad))
            fn.rope_pos[:b].copy_(torch.tensor([s.rope_pos for s in self.active] + pad))
            self._inputs_stale, self._last_bucket = False, b
        every = self.config.clamp_effect_every
        measure = self.sae is not None and every > 0 and self.stats["decode_steps"] % every == 0
        variant = variant_for([(s.steering_row, s.decode_in_scope) for s in self.active], measure)
        if self.graphs is not None:
            logits = self.graphs(b, attend, variant)
            self.stats["graph_replays"] += 1
        else:
            with torch.inference_mode():
                logits = fn(b, attend, variant)
            self.stats["eager_steps"] += 1
        self.stats["decode_steps"] += 1
        seqs = list(self.active)
        greedy = fn.next_tokens[:n].tolist()  # the one device sync of a greedy step
        if variant.measure:
            out.clamp_effects.extend(_clamp_effects(seqs, fn.effect[:, :n].float().cpu()))
        tokens_out: list[int | RowFailure] = []
        for i, s in enumerate(seqs):
            if greedy[i] == NON_FINITE:
                tokens_out.append(RowFailure(s.req.request_id, _non_finite_message(s), NON_FINITE_CODE))
            elif s.req.sampling.greedy:
                tokens_out.append(greedy[i])
            else:
                try:
                    t = sample_row(logits[i], s.req.sampling, s.generator)
                except RuntimeError as e:  # this row's sampling alone; its neighbours carry on
                    tokens_out.append(RowFailure(s.req.request_id, f"sampling failed: {e}"))
                    continue
                fn.tokens[i] = t  # replaces the greedy guess the step wrote for this row
                tokens_out.append(t)
        for s in seqs:
            s.length += 1
            s.rope_pos += 1
        # rows are indexed by position at step time: _accept may move a later row into a freed one
        for s, t, row_logits in zip(seqs, tokens_out, logits[:n], strict=True):
            if isinstance(t, RowFailure):
                self._fail(s, t, out)
            else:
                self._accept(s, t, row_logits, events, done)

    def _accept(self, seq: _Sequence, token: int, logits: torch.Tensor, events, done) -> None:
        p = seq.req.sampling
        seq.generated.append(token)
        logprob = float(torch.log_softmax(logits, -1)[token]) if p.logprobs else None
        if logprob is not None:
            seq.logprobs.append(logprob)
        old_len = len(seq.text)
        delta = self._detokenize(seq)
        seq.text += delta
        reason, hit_stop = None, False
        if token in self.eos_ids and not p.ignore_eos:
            reason = "stop"
        elif p.stop and delta:
            window_start = max(0, old_len - max(len(s) for s in p.stop) + 1)
            hits = [i for i in (seq.text.find(s, window_start) for s in p.stop) if i >= 0]
            if hits:
                seq.text = seq.text[: min(hits)]
                delta = seq.text[old_len:]
                reason, hit_stop = "stop", True
        if reason is None and (len(seq.generated) >= p.max_tokens or seq.length + 1 >= self.max_len):
            reason = "length"
        if reason is not None and not hit_stop:
            # flush bytes still held back by the detokenisation window
            seq.text = self.loaded.tokenizer.decode(seq.generated, skip_special_tokens=True)
            delta = seq.text[old_len:]
        events.append(TokenEvent(seq.req.request_id, token, delta, reason is not None, reason, logprob))
        if reason is not None:
            seq.finish_reason = reason
            self._release(seq)
            done.append(GenerationResult(
                seq.req.request_id, list(seq.generated), seq.text, reason, seq.prompt_len,
                list(seq.logprobs) if p.logprobs else None,
                self._timings(seq), list(seq.steering_row.ids), *self._idle(seq),
            ))

    @staticmethod
    def _idle(seq: _Sequence) -> tuple[list[int], list[int]]:
        """The features and the edit indices whose ``when`` condition failed on this request."""
        opened = seq.steering_row.open
        if opened is None or seq.req.steering is None:
            return [], []
        idle = [i for i, acts in enumerate(opened) if not acts]
        return [seq.req.steering.edits[i].feature for i in idle], idle

    def kv_usage(self) -> float:
        """Share of the KV cache's positions holding live sequences' tokens."""
        return sum(s.length for s in self.active) / (self.cache.rows * self.cache.max_len)

    def device_memory_bytes(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0

    @staticmethod
    def _timings(seq: _Sequence) -> dict:
        end = time.perf_counter()
        return {"queue_s": seq.t_start - seq.t_submit, "prefill_s": seq.t_first - seq.t_start,
                "decode_s": end - seq.t_first, "ttft_s": seq.t_first - seq.t_submit, "total_s": end - seq.t_submit}

    def _detokenize(self, seq: _Sequence) -> str:
        """New text for the newest token; a token that ends inside a multi-byte character yields
        nothing until the character completes. The Rust ``DecodeStream`` does this in about a
        microsecond; tokenizers without a Rust backend decode a short window (as TGI does)."""
        tok = self.loaded.tokenizer
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is not None:
            if seq.stream is None:
                from tokenizers.decoders import DecodeStream

                seq.stream = DecodeStream(skip_special_tokens=True)
            return seq.stream.step(backend, seq.generated[-1]) or ""
        prefix = tok.decode(seq.generated[seq.prefix_offset : seq.read_offset], skip_special_tokens=True)
        full = tok.decode(seq.generated[seq.prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(seq.generated)
            return full[len(prefix) :]
        return ""

    def _fail(self, seq: _Sequence, failure: RowFailure, out: StepOutput) -> None:
        if seq.row >= 0:
            self.cache.scrub(seq.row)  # whatever it held (NaN, for a non-finite row) goes with it
            self._release(seq)
        out.failed.append(failure)

    def _release(self, seq: _Sequence) -> None:
        # Keep rows 0..n-1 dense and active[i].row == i: the last row moves into the freed one.
        self._inputs_stale = True
        idx = seq.row
        last = self.active.pop()
        if last is not seq:
            self.cache.move(last.row, idx, last.length)
            last.row = idx
            self.active[idx] = last
            self._write_row(last)
        self.step_fn.table.clear(len(self.active))  # the vacated row becomes padding
        seq.row = -1
