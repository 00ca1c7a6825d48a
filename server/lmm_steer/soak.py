"""``lmm-steer bench soak``: long-run behaviour of a server under steady, mixed, well-formed traffic.

A benchmark, not a test. It starts ``lmm-steer serve`` (the default model unless ``--model``) on a
free port, or soaks one already running (``--url``, with ``--pid`` for its memory), and keeps
``--clients`` callers busy for ``--minutes``: streamed and not, with images from the server's own
scene generator and without, unsteered, steered by random feature edits (clamp, add, scale; every
scope) or by a served preset, greedy and sampled; some callers drop a stream after a few chunks or
hang up before a plain answer comes. Then it reports the requests, the errors (any well-formed
request not answered 200, a stream's error event, a transport failure; a dropped caller is not an
error), p50/p99 latency of the completed ones, and the server's resident memory: when ready, at
the start (after ``--warmup-seconds`` of the same traffic, which fills the allocator's pools and
the prefill cache, and is not counted), every 10 s, and at the end. Exit status 1 when there was an
error, or the memory grew more than ``--max-rss-growth`` percent from start to end.

The traffic is the client side only (httpx); nothing here imports the HTTP layer.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

DESCRIPTION = (
    "A benchmark, not a test: start `lmm-steer serve` (or soak --url), keep --clients callers busy for --minutes "
    "with mixed traffic (streamed and not, images and text, unsteered, steered by feature edits or a preset, "
    "greedy and sampled, some callers dropping their request), then print the requests, errors, p50/p99 latency "
    "and the server's resident memory at the start (after --warmup-seconds) and at the end. Exit 1 on any error "
    "or a memory growth over --max-rss-growth percent.")
PROMPTS = ("What colour is the circle? Answer in a word or a short phrase.", "How many shapes are there?",
           "Describe the image.", "Is there a star? Answer yes or no.", "What shape is on the left?",
           "Tell me a short story.", "List three colours.")
RSS_EVERY_S = 10.0


def rss_mib(pid: int | None) -> float | None:
    """Resident memory of process ``pid`` in MiB (Linux), or None."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


class Report:
    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()
        self.latencies: list[float] = []
        self.ttfts: list[float] = []
        self.errors: list[str] = []
        self.counting = False

    def add(self, kind: str, latency: float | None = None, ttft: float | None = None,
            error: str | None = None) -> None:
        if not self.counting:
            return
        self.counts[kind] += 1
        if latency is not None:
            self.latencies.append(latency)
        if ttft is not None:
            self.ttfts.append(ttft)
        if error is not None:
            self.counts["errors"] += 1
            if len(self.errors) < 20:
                self.errors.append(error)


def request_body(rng: random.Random, model: str, images: list[str], num_latents: int | None,
                 presets: list[str]) -> tuple[dict, str]:
    """A random well-formed request and a label of its kind."""
    image = images and rng.random() < 0.3
    text = rng.choice(PROMPTS)
    content = ([{"type": "image_url", "image_url": {"url": rng.choice(images)}}] if image else []) + \
        [{"type": "text", "text": text}]
    body: dict = {"model": model, "messages": [{"role": "user", "content": content}],
                  "max_tokens": rng.randint(4, 24), "stream": rng.random() < 0.5}
    if rng.random() < 0.5:
        body["temperature"] = 0
    else:
        body.update(temperature=rng.choice([0.7, 1.0]), seed=rng.randrange(2**31))
    steered = rng.random() < 0.5 and (num_latents or presets)
    if steered:
        if presets and (not num_latents or rng.random() < 0.3):
            body["model"] = f"{model}:{rng.choice(presets)}"
        else:
            edits = [{"id": rng.randrange(num_latents), "value": round(rng.uniform(-50, 150), 2),
                      "mode": rng.choice(["clamp", "clamp", "add", "scale"])} for _ in range(rng.randint(1, 4))]
            body["steering"] = {"features": edits,
                                "scope": rng.choice(["all", "generated", "prompt"] + (["image"] if image else []))}
        if rng.random() < 0.1:
            body["return_unsteered"] = True
    kind = f"{'stream' if body['stream'] else 'plain'}{'+image' if image else ''}{'+steered' if steered else ''}"
    return body, kind


async def one_request(http: httpx.AsyncClient, rng: random.Random, body: dict, kind: str, report: Report,
                      drop: float) -> None:
    t0 = time.perf_counter()
    if body["stream"]:
        drop_after = rng.randint(1, 3) if rng.random() < drop else None
        chunks, ttft = 0, None
        try:
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    report.add(kind, error=f"{kind}: {r.status_code} {r.text[:200]}")
                    return
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line.startswith("data: {") and '"error"' in line:
                        report.add(kind, error=f"{kind}: error event {line[6:206]}")
                        return
                    chunks += 1
                    if ttft is None and chunks >= 2:  # the role chunk, then the first token
                        ttft = time.perf_counter() - t0
                    if drop_after is not None and chunks >= drop_after:
                        report.add("dropped stream")
                        return
        except httpx.HTTPError as e:
            report.add(kind, error=f"{kind}: {type(e).__name__}: {e}")
            return
        report.add(kind, latency=time.perf_counter() - t0, ttft=ttft)
        return
    hang_up = rng.random() < drop / 4
    try:
        if hang_up:  # a caller that gives up before the answer: the server must free its row
            try:
                await asyncio.wait_for(http.post("/v1/chat/completions", json=body), timeout=rng.uniform(0.05, 0.5))
            except TimeoutError:
                report.add("dropped plain")
                return
        else:
            r = await http.post("/v1/chat/completions", json=body)
            if r.status_code != 200:
                report.add(kind, error=f"{kind}: {r.status_code} {r.text[:200]}")
                return
            r.json()["choices"][0]["message"]["content"]  # noqa: B018 - a complete, parsable answer
    except (httpx.HTTPError, ValueError, KeyError) as e:
        report.add(kind, error=f"{kind}: {type(e).__name__}: {e}")
        return
    report.add(kind, latency=time.perf_counter() - t0)


async def caller(i: int, url: str, headers: dict, deadline: float, setup: dict, report: Report, args) -> None:
    rng = random.Random(args.seed * 1000 + i)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as http:
        while time.monotonic() < deadline:
            body, kind = request_body(rng, setup["model"], setup["images"], setup["num_latents"], setup["presets"])
            await one_request(http, rng, body, kind, report, args.drop)


async def server_setup(url: str, headers: dict, images: int) -> dict:
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as http:
        cards = (await http.get("/v1/models")).json()["data"]
        base = next(c for c in cards if not c.get("parent"))
        presets = [c["preset"]["name"] for c in cards if c.get("parent")]
        urls = []
        for index in range(images):
            r = await http.post("/v1/scenes", json={"seed": 7, "index": index})
            urls.append(r.json()["image"] if r.status_code == 200 else _small_png(index))
        if urls:  # a text-only model refuses images: then none are sent
            probe = await http.post("/v1/chat/completions", json={"max_tokens": 1, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": urls[0]}}, {"type": "text", "text": "hi"}]}]})
            urls = urls if probe.status_code == 200 else []
    return {"model": base["id"], "num_latents": (base.get("sae") or {}).get("num_latents"), "presets": presets,
            "images": urls}


def _small_png(seed: int) -> str:
    import io

    from PIL import Image

    rng = random.Random(seed)
    img = Image.new("RGB", (64, 64), tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def sample_rss(pid: int | None, samples: list, stop: asyncio.Event, t0: float) -> None:
    while not stop.is_set():
        samples.append((round(time.monotonic() - t0, 1), rss_mib(pid)))
        try:
            await asyncio.wait_for(stop.wait(), RSS_EVERY_S)
        except TimeoutError:
            pass


async def soak(url: str, pid: int | None, args) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    setup = await server_setup(url, headers, args.images)
    report = Report()
    out: dict = {"url": url, "model": setup["model"], "minutes": args.minutes, "clients": args.clients,
                 "warmup_seconds": args.warmup_seconds, "drop": args.drop, "seed": args.seed,
                 "presets": setup["presets"], "images": len(setup["images"]), "rss_mib_ready": rss_mib(pid)}
    t0 = time.monotonic()
    warm_end = t0 + args.warmup_seconds
    deadline = warm_end + args.minutes * 60
    samples: list = []
    stop = asyncio.Event()
    callers = [asyncio.create_task(caller(i, url, headers, deadline, setup, report, args)) for i in range(args.clients)]
    await asyncio.sleep(max(0.0, warm_end - time.monotonic()))
    report.counting = True
    out["rss_mib_start"] = rss_mib(pid)
    sampler = asyncio.create_task(sample_rss(pid, samples, stop, warm_end))
    await asyncio.gather(*callers)
    stop.set()
    await sampler
    await asyncio.sleep(1)  # let the server settle what the last callers left
    out["rss_mib_end"] = rss_mib(pid)
    out["seconds"] = round(time.monotonic() - warm_end, 1)
    counts = report.counts
    out["requests"] = sum(v for k, v in counts.items() if k != "errors")
    out["completed"] = len(report.latencies)
    out["dropped"] = counts["dropped stream"] + counts["dropped plain"]
    out["errors"] = counts["errors"]
    out["by_kind"] = dict(sorted((k, v) for k, v in counts.items() if k != "errors"))
    out["latency_s"] = {"p50": percentile(report.latencies, 50), "p99": percentile(report.latencies, 99),
                        "mean": statistics.fmean(report.latencies) if report.latencies else None}
    out["ttft_s"] = {"p50": percentile(report.ttfts, 50), "p99": percentile(report.ttfts, 99)}
    out["requests_per_s"] = round(out["completed"] / out["seconds"], 3) if out["seconds"] else None
    start, end = out["rss_mib_start"], out["rss_mib_end"]
    out["rss_growth_pct"] = round(100 * (end - start) / start, 2) if start and end else None
    out["rss_mib_samples"] = samples
    out["error_examples"] = report.errors
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as http:
        after = await http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0})
    out["serving_after"] = after.status_code == 200
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "lmm_steer.cli", "serve", "--port", str(port), "--log-level", "warning"]
    if args.model:
        cmd += ["--model", args.model]
    cmd += list(args.serve_arg)
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - the server's stderr, read if it fails
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"lmm-steer bench soak: the server exited: {log.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"lmm-steer bench soak: the server was not ready within {args.start_timeout:g} s")


def text_report(r: dict) -> str:
    def f(v, fmt="{:.3f}"):
        return "-" if v is None else fmt.format(v)

    lines = [
        f"soak of {r['model']} at {r['url']}: {r['clients']} clients for {r['seconds']} s "
        f"(after {r['warmup_seconds']:g} s of warm-up)",
        f"requests   {r['requests']} ({r['completed']} completed, {r['dropped']} dropped by their caller on purpose)",
        f"errors     {r['errors']}",
        f"latency    p50 {f(r['latency_s']['p50'])} s, p99 {f(r['latency_s']['p99'])} s; "
        f"first token p50 {f(r['ttft_s']['p50'])} s, p99 {f(r['ttft_s']['p99'])} s",
        f"RSS        {f(r['rss_mib_ready'], '{:.0f}')} MiB ready, {f(r['rss_mib_start'], '{:.0f}')} MiB at the start, "
        f"{f(r['rss_mib_end'], '{:.0f}')} MiB at the end ({f(r['rss_growth_pct'], '{:+.2f}')}%)",
        "by kind    " + ", ".join(f"{k} {v}" for k, v in r["by_kind"].items()),
        f"serving after: {'yes' if r['serving_after'] else 'NO'}",
    ]
    if "server_exit" in r:
        lines.append(f"server exit after SIGTERM: {r['server_exit']}")
    lines += [f"error: {e}" for e in r["error_examples"]]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--minutes", type=float, required=True, help="how long to measure, after the warm-up")
    p.add_argument("--url", help="soak this running server instead of starting one")
    p.add_argument("--pid", type=int, help="with --url: the server's process id, to read its resident memory")
    p.add_argument("--api-key", help="with --url: the server's API key")
    p.add_argument("--model", help="the model of the server started here (default: serve's default)")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="one more argument for the server started here (repeatable, e.g. --serve-arg=--max-batch "
                        "--serve-arg=16)")
    p.add_argument("--clients", type=int, default=8, help="concurrent callers (default 8)")
    p.add_argument("--warmup-seconds", type=float, default=30.0,
                   help="traffic before the measured part: not counted; the start RSS is read after it (default 30)")
    p.add_argument("--drop", type=float, default=0.2,
                   help="share of streams dropped after 1-3 chunks; a quarter as many plain requests hang up "
                        "(default 0.2)")
    p.add_argument("--images", type=int, default=8, help="scenes from the server's generator to send (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-rss-growth", type=float, default=5.0, metavar="PERCENT",
                   help="exit 1 when the memory grew more than this from start to end (default 5)")
    p.add_argument("--start-timeout", type=float, default=600.0, metavar="SECONDS")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON (with the RSS samples)")


def main(args) -> int:
    proc = None
    if args.url:
        url, pid = args.url.rstrip("/"), args.pid
    else:
        proc, url = start_server(args)
        pid = proc.pid
    try:
        result = asyncio.run(soak(url, pid, args))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = "killed after 120 s"
    if proc is not None:
        result["server_exit"] = code
    print(text_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    growth = result["rss_growth_pct"]
    bad = result["errors"] or not result["serving_after"] or (growth is not None and growth > args.max_rss_growth)
    return 1 if bad else 0
