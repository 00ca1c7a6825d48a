"""Soak a running server the way a hostile crowd would, and report what it answered.

    python tests/soak.py --url http://127.0.0.1:8000 [--clients 64] [--seconds 120] [--drop 0.2]
                         [--bad 0.1] [--seed 0] [--pid PID] [--huge-prompts 3] [--json PATH]

Each client loops over random chat requests: streamed or not, random clamps on random features
(values up to the server's bound, in clamp/add/scale modes and every scope), random sampling
settings; ``--drop`` of the streams are abandoned after a few chunks and ``--bad`` of the
requests are malformed on purpose. With ``--huge-prompts N``, N prompts of 20 MB are sent at
once first. With ``--pid`` (a server on this machine) its resident memory is read before and
after. The report counts answers by status; a 5xx is a failure of the server, and the script
exits 1 if there was any. Not part of the test suite: docs/hardening.md records runs. For a long run
under well-formed traffic (errors, latency and memory over minutes), see ``lmm-steer bench soak``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import sys
import time

import httpx

HUGE_BYTES = 20_000_000


def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


def random_body(rng: random.Random, num_latents: int, bound: float) -> dict:
    body: dict = {"messages": [{"role": "user", "content": rng.choice(
        ["Write a short poem.", "Tell me a story.", "What is the ocean?", "Describe a city at night.",
         "List three fruits.", "Explain rain to a child."])}],
        "max_tokens": rng.randint(1, 32), "temperature": rng.choice([0, 0, 0.7, 1.0, 1.5]),
        "stream": rng.random() < 0.5}
    if rng.random() < 0.3:
        body["top_p"] = rng.choice([0.1, 0.9, 1e-300])
    if rng.random() < 0.3:
        body["seed"] = rng.randint(0, 2**32)
    r = rng.random()
    if r < 0.35:
        body["clamps"] = {str(rng.randrange(num_latents)): rng.uniform(-bound, bound) / 10 for _ in range(rng.randint(1, 8))}
    elif r < 0.7:
        feats = rng.sample(range(num_latents), rng.randint(1, 8))
        body["steering"] = {"features": [{"id": f, "value": rng.uniform(-bound, bound) / rng.choice([1, 10, 100]),
                                          "mode": rng.choice(["clamp", "add", "scale"])} for f in feats],
                            "scope": rng.choice(["all", "prompt", "generated"]),
                            "semantics": rng.choice(["delta", "delta", "paper"])}
    if rng.random() < 0.1:
        body["return_unsteered"] = True
    return body


def bad_body(rng: random.Random, num_latents: int) -> dict:
    msgs = [{"role": "user", "content": "hi"}]
    return rng.choice([
        {"messages": msgs, "clamps": {str(num_latents): 1}},
        {"messages": msgs, "clamps": {"²": 1}},
        {"messages": msgs, "seed": 2**64},
        {"messages": msgs, "steering": {"features": [{"id": 1, "value": 1e308}]}},
        {"messages": msgs, "max_tokens": "4"},
        {"messages": msgs, "tools": [{"type": "function", "function": {"name": "f"}}]},
        {"messages": []},
        {"messages": msgs, "max_tokens": 10**9},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]},
    ])


async def client_loop(i, url, headers, deadline, args, num_latents, bound, counts, failures):
    rng = random.Random(args.seed * 1000 + i)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300) as http:
        while time.monotonic() < deadline:
            bad = rng.random() < args.bad
            body = bad_body(rng, num_latents) if bad else random_body(rng, num_latents, bound)
            try:
                if body.get("stream") and not bad:
                    drop_after = rng.randint(1, 4) if rng.random() < args.drop else None
                    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                        n = 0
                        async for line in r.aiter_lines():
                            if line.startswith("data: {") and '"error"' in line and r.status_code == 200:
                                code = json.loads(line[6:])["error"]["code"]
                                counts[f"stream error event {code}"] += 1
                            n += 1
                            if drop_after is not None and n >= drop_after:
                                counts["dropped stream"] += 1
                                break
                        status = r.status_code
                else:
                    r = await http.post("/v1/chat/completions", json=body)
                    status = r.status_code
                    if status >= 500:
                        failures.append(r.text[:300])
                counts[f"{status}{' (bad on purpose)' if bad else ''}"] += 1
                if status >= 500:
                    counts["5xx"] += 1
            except httpx.HTTPError as e:
                counts[f"transport error {type(e).__name__}"] += 1


async def huge_prompts(url, headers, n) -> list[dict]:
    body = json.dumps({"messages": [{"role": "user", "content": "word " * (HUGE_BYTES // 5)}],
                       "max_tokens": 4}).encode()

    async def one(http):
        t0 = time.perf_counter()
        r = await http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        return {"status": r.status_code, "seconds": round(time.perf_counter() - t0, 3),
                "message": r.json()["error"]["message"][:120] if r.status_code >= 400 else ""}

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as http:
        return list(await asyncio.gather(*(one(http) for _ in range(n))))


async def main(args) -> int:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=30) as http:
        sae = (await http.get("/v1/models")).json()["data"][0]["sae"] or {}
    num_latents = sae.get("num_latents") or 1
    report: dict = {"url": args.url, "clients": args.clients, "seconds": args.seconds, "drop": args.drop,
                    "bad": args.bad, "seed": args.seed, "rss_mib_before": rss_mib(args.pid)}
    if args.huge_prompts:
        report["huge_prompts"] = await huge_prompts(args.url, headers, args.huge_prompts)
        await asyncio.sleep(1)
        report["rss_mib_after_huge"] = rss_mib(args.pid)
    counts: collections.Counter = collections.Counter()
    failures: list[str] = []
    deadline = time.monotonic() + args.seconds
    await asyncio.gather(*(client_loop(i, args.url, headers, deadline, args, num_latents, args.bound, counts, failures)
                           for i in range(args.clients)))
    await asyncio.sleep(2)
    report["counts"] = dict(sorted(counts.items()))
    report["requests"] = sum(v for k, v in counts.items() if k[0].isdigit())
    report["5xx"] = counts["5xx"]
    report["failures"] = failures[:10]
    report["rss_mib_after"] = rss_mib(args.pid)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=60) as http:
        ok = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                            "max_tokens": 2})
    report["serving_after"] = ok.status_code == 200
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 1 if report["5xx"] or not report["serving_after"] else 0


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=120)
    p.add_argument("--drop", type=float, default=0.2, help="share of streams abandoned after a few chunks")
    p.add_argument("--bad", type=float, default=0.1, help="share of requests malformed on purpose")
    p.add_argument("--bound", type=float, default=1e4, help="the server's --max-steer-value")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pid", type=int, help="the server's process id, to read its resident memory")
    p.add_argument("--huge-prompts", type=int, default=0, metavar="N")
    p.add_argument("--json")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
