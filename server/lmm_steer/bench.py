"""``lmm-steer bench``: decode throughput and latency, every number beside a baseline from the same run.

Configurations, each per batch size:
  hf        transformers ``generate()`` on the same model (the baseline users have today)
  engine    our engine, no SAE
  sae       our engine with the SAE spliced in, requests without clamps
  steered   our engine with N clamps per row, different in every row
and on CUDA each engine configuration with and without CUDA graphs; with ``--compile``, also the
no-SAE and steered engines with torch.compile'd blocks and steering edit (compile time excluded,
like capture time). Also: time to first token for a text prompt and for one image, peak host and
device memory, and on CUDA the fraction of the weight-read limit (weight bytes read per decode
step / copy bandwidth measured at start), the greedy agreement between graph and eager decoding,
and, last, a kernel profile of every captured step timed alone (where its device time goes).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from dataclasses import dataclass, replace

import torch

from . import step_profile
from .engine import Engine, EngineConfig, FeatureEdit, GenerationRequest, SamplingParams, SteeringSpec
from .engine.factory import add_decode_arguments, add_device_arguments, pick_device, pick_dtype
from .engine.hookpoint import default_hookpoint, language_model
from .models.loader import load_model


@dataclass
class BenchArgs:
    model: str
    sae: str | None
    hookpoint: str | None
    batches: list[int]
    clamps: int
    new_tokens: int
    prompt_tokens: int
    image: bool
    cuda_graphs: bool
    compile: bool
    dtype: str | None
    device: str | None
    hf_max_batch: int
    agreement_rows: int


def _log(msg: str) -> None:
    import sys

    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device, gib: float = 2.0) -> float | None:
    """Bytes per second of a device-to-device copy (read + write), best of several."""
    if device.type != "cuda":
        return None
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(6):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 2 / best


def decode_weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: every language-model weight except the embedding
    table (one row per token), plus the output head."""
    decoder = language_model(model)
    embed = decoder.embed_tokens.weight
    total = sum(p.numel() * p.element_size() for p in decoder.parameters() if p is not embed)
    head = model.get_output_embeddings().weight
    if head is not embed:
        total += head.numel() * head.element_size()
    return total


def _prompt(rng: torch.Generator, n: int, vocab: int) -> list[int]:
    return torch.randint(10, vocab, (n,), generator=rng).tolist()


def _steering(row: int, clamps: int, num_latents: int) -> SteeringSpec:
    feats = [((row * clamps + j) * 7919 + 13) % num_latents for j in range(clamps)]
    return SteeringSpec([FeatureEdit(f, 10.0 + j) for j, f in enumerate(feats)])


def _requests(prompts, new_tokens, steer: bool, clamps: int, num_latents: int):
    return [
        GenerationRequest(
            prompt_ids=p, sampling=SamplingParams(max_tokens=new_tokens, ignore_eos=True),
            steering=_steering(i, clamps, num_latents) if steer else None,
        )
        for i, p in enumerate(prompts)
    ]


def engine_decode_rate(engine: Engine, prompts, new_tokens, steer, clamps, graphs: bool) -> float:
    """Decode tokens per second over a batch that starts together (prefill excluded)."""
    num_latents = engine.sae.num_latents if engine.sae is not None else 1
    saved = engine.graphs
    if not graphs:
        engine.graphs = None
    try:
        # Warm-up with the same shapes captures the graphs; capture time is not decode time.
        engine.generate(_requests(prompts, min(4, new_tokens), steer, clamps, num_latents))
        for key in ("decode_tokens", "decode_time_s"):
            engine.stats[key] = 0
        engine.generate(_requests(prompts, new_tokens, steer, clamps, num_latents))
    finally:
        engine.graphs = saved
    return engine.stats["decode_tokens"] / engine.stats["decode_time_s"]


def _captured_graph(engine: Engine, batch: int, steered: bool):
    """The engine's captured step for ``batch`` rows (its longest length bucket), with the rows'
    positions set back so that replays stay inside the cache (each replay advances them)."""
    keys = [k for k in engine.graphs.graphs if k[0] == batch and (not k[2].plain) == steered]
    if not keys:
        raise RuntimeError(f"no captured graph for batch {batch} (steered={steered})")
    fn = engine.step_fn
    fn.write_pos[:batch].fill_(8)
    fn.rope_pos[:batch].fill_(8)
    engine._inputs_stale = True  # the engine rewrites its inputs before its next step
    return engine.graphs.graphs[max(keys, key=lambda k: k[1])][0]


def device_step_rate(engine: Engine, batch: int, steered: bool, replays: int = 30) -> float:
    """Tokens per second of the captured step alone (graph replays timed with CUDA events), i.e.
    without the host's per-step work; the gap to the end-to-end rate is host overhead."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for n in (3, replays):
        graph = _captured_graph(engine, batch, steered)
        start.record()
        for _ in range(n):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
    return batch * replays / (start.elapsed_time(end) / 1000)


def device_step_profile(engine: Engine, batch: int, steered: bool) -> dict:
    """The captured step's kernels, by kind, per step (see :mod:`lmm_steer.step_profile`)."""
    return step_profile.profile_replays(_captured_graph(engine, batch, steered).replay)


def hf_decode_rate(model, prompts, new_tokens, device) -> float:
    ids = torch.tensor(prompts, device=device)
    kw = {"do_sample": False, "attention_mask": torch.ones_like(ids), "pad_token_id": 0}

    def run(n):
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        _sync(device)
        return time.perf_counter() - t0

    run(2)  # warm-up
    t1 = min(run(1) for _ in range(2))
    tn = run(new_tokens)
    return ids.shape[0] * (new_tokens - 1) / max(tn - t1, 1e-9)


def ttft(engine: Engine, images: list, text: str) -> float:
    req = GenerationRequest(
        messages=[{"role": "user", "content": [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]}],
        images=images, sampling=SamplingParams(max_tokens=1, ignore_eos=True),
    )
    engine.generate([req])  # warm-up (lazy initialisation, kernels for this shape)
    req.request_id = None
    result = engine.generate([req])[0]
    return result.timings["ttft_s"]


def greedy_agreement(engine: Engine, prompts, new_tokens, clamps, compiled: Engine | None = None) -> dict:
    """Greedy tokens of a mixed batch (every other row steered), compared: batch vs each request run
    alone, graph-captured batch vs the same batch eager, and, given a ``compiled`` engine, its batch
    vs this engine's (fused kernels round differently, so on bf16 a few tokens may differ)."""
    num_latents = engine.sae.num_latents if engine.sae is not None else 1

    def requests():
        reqs = _requests(prompts, new_tokens, False, clamps, num_latents)
        for i, r in enumerate(reqs):
            if i % 2 == 0 and engine.sae is not None:
                r.steering = _steering(i, clamps, num_latents)
        return reqs

    def compare(a, b):
        return {
            "sequences_identical": sum(x == y for x, y in zip(a, b, strict=True)), "sequences": len(a),
            "tokens_identical": sum(p == q for x, y in zip(a, b, strict=True) for p, q in zip(x, y, strict=True)),
            "tokens": sum(len(x) for x in a),
        }

    batched = [r.token_ids for r in engine.generate(requests())]
    alone = [engine.generate([r])[0].token_ids for r in requests()]
    out = {"batched_vs_alone": compare(batched, alone)}
    if engine.graphs is not None:
        saved, engine.graphs = engine.graphs, None
        try:
            out["graph_vs_eager"] = compare(batched, [r.token_ids for r in engine.generate(requests())])
        finally:
            engine.graphs = saved
    if compiled is not None:
        try:
            out["compiled_vs_not"] = compare(batched, [r.token_ids for r in compiled.generate(requests())])
        except Exception as e:  # noqa: BLE001 - the other comparisons still count
            out["compiled_vs_not"] = {"error": f"{type(e).__name__}: {e}"}
    return out


def run_bench(a: BenchArgs, checkpoint=None) -> dict:
    """Every measurement of the module docstring, as one JSON-able dict, also handed to
    ``checkpoint(result)`` after each batch size and each later stage: a run cut short by its time
    limit keeps what it measured. On CUDA the captured steps are profiled last, because the
    profiler (CUPTI) may slow what runs after it, or with some CUDA versions crash on graphs."""
    device = pick_device(a.device)
    dtype = pick_dtype(a.dtype, device)
    bandwidth = copy_bandwidth(device)
    t0 = time.perf_counter()
    loaded = load_model(a.model, dtype=dtype, device=device)
    _sync(device)
    load_s = time.perf_counter() - t0
    model = loaded.model
    hidden = language_model(model).config.hidden_size
    sae = None
    hookpoint = a.hookpoint
    if a.sae:
        from sae_weights import load_sae

        sae = load_sae(a.sae, hookpoint=hookpoint, device=device, dtype=dtype, d_in=hidden)
        hookpoint = hookpoint or sae.cfg.hookpoint or default_hookpoint(model)
    max_batch = max(a.batches)
    seq_len = a.prompt_tokens + a.new_tokens + 16
    cfg = EngineConfig(max_batch=max_batch, max_seq_len=seq_len, max_clamps=max(a.clamps, 1),
                       cuda_graphs=a.cuda_graphs)
    plain = Engine(loaded, None, None, cfg)
    steerable = Engine(loaded, sae, hookpoint, cfg) if sae is not None else None
    compiled: list[tuple[str, Engine, bool]] = []  # (row name, engine, steered)
    if a.compile:
        ccfg = replace(cfg, compile=True)
        compiled.append(("engine, no SAE", Engine(loaded, None, None, ccfg), False))
        if sae is not None:
            compiled.append((f"engine + SAE, {a.clamps} clamps/row", Engine(loaded, sae, hookpoint, ccfg), True))
    rng = torch.Generator().manual_seed(0)
    vocab = min(len(loaded.tokenizer), model.get_output_embeddings().weight.shape[0])
    rows: dict[str, dict[int, float]] = {}
    use_graphs = plain.graphs is not None
    modes = [True, False] if use_graphs else [False]
    _log(f"loaded {a.model} in {load_s:.1f}s; engines ready")
    errors: list[str] = []
    profiles: dict[str, dict] = {}

    def measure(name: str, b: int, fn, *args) -> None:
        # One failing configuration (say, a capture error) must not cost the rest of a GPU run.
        try:
            rows.setdefault(name, {})[b] = fn(*args)
        except Exception as e:  # noqa: BLE001 - reported in the output, never swallowed silently
            errors.append(f"{name}, batch {b}: {type(e).__name__}: {e}")
            _log(errors[-1])

    to_profile: list[tuple[str, Engine, int, bool]] = []
    result: dict = {
        "model": a.model, "sae": a.sae, "hookpoint": hookpoint, "device": str(device), "dtype": str(dtype),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
        "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens, "clamps": a.clamps,
        "model_load_s": round(load_s, 2), "decode_tok_s": rows, "errors": errors, "step_profile": profiles,
        "decode_weight_bytes": decode_weight_bytes(model),
    }
    if bandwidth:
        result["copy_bandwidth_Bps"] = bandwidth
        result["weight_read_limit_tok_s_b1"] = bandwidth / result["decode_weight_bytes"]

    def save() -> None:
        if device.type == "cuda":
            result["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
        result["peak_host_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result["ratios"] = ratios(rows, a.clamps, result.get("weight_read_limit_tok_s_b1"))
        if checkpoint is not None:
            checkpoint(result)

    def device_step(what: str, b: int, engine: Engine, steer: bool, compiled: bool = False) -> None:
        tag = " [compiled]" if compiled else ""
        measure(f"device step only, {what} [graph]{tag}", b, device_step_rate, engine, b, steer)
        to_profile.append((f"{what}{tag}, batch {b}", engine, b, steer))

    for b in a.batches:
        prompts = [_prompt(rng, a.prompt_tokens, vocab) for _ in range(b)]
        _log(f"batch {b}")
        if b <= a.hf_max_batch:
            measure("hf generate()", b, hf_decode_rate, model, prompts, a.new_tokens, device)
        for graphs in modes:
            tag = " [graph]" if graphs else (" [eager]" if use_graphs else "")
            measure(f"engine, no SAE{tag}", b, engine_decode_rate, plain, prompts, a.new_tokens, False, a.clamps,
                    graphs)
            if steerable is not None:
                measure(f"engine + SAE, no clamps{tag}", b, engine_decode_rate, steerable, prompts, a.new_tokens,
                        False, a.clamps, graphs)
                measure(f"engine + SAE, {a.clamps} clamps/row{tag}", b, engine_decode_rate, steerable, prompts,
                        a.new_tokens, True, a.clamps, graphs)
                # serve's default: one decode step in 16 also measures the clamp effect
                steerable.config.clamp_effect_every = 16
                try:
                    measure(f"engine + SAE, {a.clamps} clamps/row, clamp effect 1/16{tag}", b, engine_decode_rate,
                            steerable, prompts, a.new_tokens, True, a.clamps, graphs)
                finally:
                    steerable.config.clamp_effect_every = 0
        for name, engine, steer in compiled:
            measure(f"{name}{' [graph]' if use_graphs else ''} [compiled]", b, engine_decode_rate, engine, prompts,
                    a.new_tokens, steer, a.clamps, use_graphs)
        if use_graphs:
            device_step("no SAE", b, plain, False)
            if steerable is not None:
                device_step(f"{a.clamps} clamps/row", b, steerable, True)
            for _, engine, steer in compiled:
                device_step(f"{a.clamps} clamps/row" if steer else "no SAE", b, engine, steer, compiled=True)
        save()
    _log("time to first token")
    text_prompt = "Tell me a story about Alice and Bob. " * max(1, a.prompt_tokens // 10)
    # one row with room for a full AnyRes image (about 2,900 tokens at 672 px)
    # no prefill reuse: the warm-up's prefill of the same prompt would be returned, not timed
    single = Engine(loaded, None, None, EngineConfig(max_batch=1, max_seq_len=4096, cuda_graphs=False,
                                                     prefill_cache_tokens=0))
    result["ttft_text_s"] = ttft(single, [], text_prompt)
    if a.image and loaded.is_multimodal:
        from PIL import Image

        size = 672 if "8b" in a.model else 64
        img = Image.fromarray((torch.rand(size, size, 3, generator=rng) * 255).to(torch.uint8).numpy())
        result["ttft_image_s"] = ttft(single, [img], "What is in this image?")
        result["image_px"] = size
    save()
    if steerable is not None and a.agreement_rows:
        prompts = [_prompt(rng, a.prompt_tokens, vocab) for _ in range(a.agreement_rows)]
        _log("greedy agreement")
        try:
            compiled_steerable = next((e for _, e, steer in compiled if steer), None)
            result["greedy_agreement"] = greedy_agreement(steerable, prompts, a.new_tokens, a.clamps,
                                                          compiled_steerable)
        except Exception as e:  # noqa: BLE001
            errors.append(f"greedy agreement: {type(e).__name__}: {e}")
    save()  # peak memory as the measurements left it, before the profiler adds its own
    for name, engine, b, steer in to_profile:
        _log(f"profile: {name}")
        try:
            profiles[name] = device_step_profile(engine, b, steer)
        except Exception as e:  # noqa: BLE001
            errors.append(f"profile of {name}: {type(e).__name__}: {e}")
            _log(errors[-1])
    return result


def ratios(rows: dict[str, dict[int, float]], clamps: int, limit_b1: float | None) -> dict:
    out: dict[str, dict[int, float]] = {}
    names = list(rows)
    graph = any(n.endswith("[graph]") for n in names)
    best = " [graph]" if graph else ""
    hf = rows.get("hf generate()", {})
    plain = rows.get(f"engine, no SAE{best}", {})
    sae = rows.get(f"engine + SAE, no clamps{best}", {})
    steered = rows.get(f"engine + SAE, {clamps} clamps/row{best}", {})

    def ratio(name, num, den):
        vals = {b: num[b] / den[b] for b in num if b in den and den[b] > 0}
        if vals:
            out[name] = vals

    ratio("engine / hf generate()", plain, hf)
    ratio("steered engine / hf generate()", steered, hf)
    ratio("SAE no clamps / no SAE", sae, plain)
    ratio("steered / no SAE", steered, plain)
    ratio("steered / SAE no clamps", steered, sae)
    ratio("clamp effect 1/16 / steered", rows.get(f"engine + SAE, {clamps} clamps/row, clamp effect 1/16{best}", {}),
          steered)
    ratio("device step only: steered / no SAE", rows.get(f"device step only, {clamps} clamps/row [graph]", {}),
          rows.get("device step only, no SAE [graph]", {}))
    if graph:
        for base in ("engine, no SAE", f"engine + SAE, {clamps} clamps/row"):
            ratio(f"graph / eager ({base})", rows.get(f"{base} [graph]", {}), rows.get(f"{base} [eager]", {}))
    compiled_plain = rows.get(f"engine, no SAE{best} [compiled]", {})
    compiled_steered = rows.get(f"engine + SAE, {clamps} clamps/row{best} [compiled]", {})
    ratio("compiled / not (engine, no SAE)", compiled_plain, plain)
    ratio("compiled / not (steered)", compiled_steered, steered)
    ratio("steered / no SAE (compiled)", compiled_steered, compiled_plain)
    for what in ("no SAE", f"{clamps} clamps/row"):
        ratio(f"device step only: compiled / not ({what})", rows.get(f"device step only, {what} [graph] [compiled]", {}),
              rows.get(f"device step only, {what} [graph]", {}))
    ratio("device step only: steered / no SAE (compiled)",
          rows.get(f"device step only, {clamps} clamps/row [graph] [compiled]", {}),
          rows.get("device step only, no SAE [graph] [compiled]", {}))
    if limit_b1:
        for name, vals in (("no SAE", plain), (f"{clamps} clamps/row", steered),
                           ("no SAE, compiled", compiled_plain), (f"{clamps} clamps/row, compiled", compiled_steered)):
            if 1 in vals:
                out[f"fraction of weight-read limit ({name})"] = {1: vals[1] / limit_b1}
    return out


def markdown(result: dict) -> str:
    rows = result["decode_tok_s"]
    batches = sorted({b for r in rows.values() for b in r})
    head = "| decode tok/s | " + " | ".join(f"batch {b}" for b in batches) + " |"
    lines = [head, "|---|" + "---|" * len(batches)]
    for name, vals in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{vals[b]:.1f}" if b in vals else "-" for b in batches) + " |")
    lines += ["", "| ratio | " + " | ".join(f"batch {b}" for b in batches) + " |", "|---|" + "---|" * len(batches)]
    for name, vals in result["ratios"].items():
        lines.append(f"| {name} | " + " | ".join(f"{vals[b]:.3f}" if b in vals else "-" for b in batches) + " |")
    lines.append("")
    if result.get("step_profile"):
        lines += step_profile.markdown(result["step_profile"]) + [""]
    facts = [("time to first token, text prompt", "ttft_text_s", "{:.4f} s"),
             ("time to first token, one image", "ttft_image_s", "{:.4f} s"),
             ("image size (px)", "image_px", "{}"),
             ("weights read per decode step", "decode_weight_bytes", "{:.3e} B"),
             ("copy bandwidth", "copy_bandwidth_Bps", "{:.3e} B/s"),
             ("weight-read limit at batch 1", "weight_read_limit_tok_s_b1", "{:.1f} tok/s"),
             ("peak device memory", "peak_device_bytes", "{:.3e} B"),
             ("peak host memory", "peak_host_bytes", "{:.3e} B"),
             ("greedy agreement (mixed steered batch)", "greedy_agreement", "{}"),
             ("model build/load", "model_load_s", "{} s")]
    for label, key, fmt in facts:
        if key in result:
            lines.append(f"- {label}: {fmt.format(result[key])}")
    lines += [f"- error: {e}" for e in result.get("errors", [])]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="builtin:tiny-llava-next")
    p.add_argument("--sae", default="builtin:random-topk")
    p.add_argument("--hookpoint")
    p.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--clamps", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--image", action="store_true", help="also time the first token of a one-image prompt")
    add_decode_arguments(p)
    add_device_arguments(p)
    p.add_argument("--hf-max-batch", type=int, default=1 << 30, help="skip generate() above this batch size")
    p.add_argument("--agreement-rows", type=int, default=8)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--markdown", metavar="PATH", help="also write the table as markdown")


def main(args) -> int:
    a = BenchArgs(
        model=args.model, sae=None if (args.sae or "").lower() in ("", "none") else args.sae,
        hookpoint=args.hookpoint, batches=[int(x) for x in args.batch.split(",")], clamps=args.clamps,
        new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens, image=args.image,
        cuda_graphs=not args.no_cuda_graphs, compile=args.compile, dtype=args.dtype, device=args.device,
        hf_max_batch=args.hf_max_batch, agreement_rows=args.agreement_rows,
    )

    def write(result: dict) -> str:
        table = markdown(result)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2, default=str)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(table + "\n")
        return table

    print(write(run_bench(a, checkpoint=write)))
    return 0
