"""SIGTERM drains: no new work is admitted, running requests finish or end with an OpenAI-shaped
error at the drain deadline, and the process exits 0."""

import json
import signal
import threading
import time

import httpx
import pytest
from servers import Server, wait_for

LONG = {"messages": [{"role": "user", "content": "Tell me a long story"}], "max_tokens": 4000, "ignore_eos": True,
        "temperature": 0}


@pytest.fixture
def serve():
    started = []

    def start(*extra):
        started.append(Server("--model", "builtin:tiny-llama", "--sae", "builtin:random-topk", "--max-seq-len", "4096",
                              *extra))
        return started[-1]

    yield start
    for s in started:  # a test that failed midway leaves no process behind
        s.stop()


def _stream_events(s, body, out: list, started: threading.Event):
    with httpx.stream("POST", f"{s.url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        out.append(r.status_code)
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(line[6:])
                started.set()
    started.set()


def test_idle_server_exits_0_on_sigterm(serve):
    s = serve()
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(timeout=15) == 0


def test_running_requests_finish_while_new_ones_get_503(serve):
    s = serve("--drain-timeout", "60")
    events, started = [], threading.Event()
    body = {**LONG, "max_tokens": 1500}
    t = threading.Thread(target=_stream_events, args=(s, body, events, started))
    t.start()
    assert started.wait(20)
    s.proc.send_signal(signal.SIGTERM)
    assert wait_for(lambda: s.get("/ready").status_code == 503, 5)
    refused = s.post("/v1/chat/completions", {**LONG, "max_tokens": 2})
    assert refused.status_code == 503 and int(refused.headers["Retry-After"]) > 0
    assert refused.json()["error"]["code"] == "server_shutting_down"
    assert s.get("/health").status_code == 200  # liveness holds while draining
    t.join(60)
    assert events[0] == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[1:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and "error" not in chunks[-1]
    assert s.proc.wait(timeout=20) == 0


def _two_running_one_queued(s):
    """At --max-batch 2: a plain request and a stream running, a second stream queued behind them.
    Returns (replies, the running stream's events, the queued stream's events, the threads)."""
    replies = {}

    def plain():
        replies["plain"] = s.post("/v1/chat/completions", LONG)

    stream_events, queued_events = [], []
    threads = [threading.Thread(target=plain),
               threading.Thread(target=_stream_events, args=(s, LONG, stream_events, threading.Event()))]
    for t in threads:
        t.start()
    assert wait_for(lambda: s.metric("lmm_steer:num_requests_running") == 2)
    queued = threading.Thread(target=_stream_events, args=(s, LONG, queued_events, threading.Event()))
    queued.start()
    assert wait_for(lambda: s.metric("lmm_steer:num_requests_waiting") == 1)
    return replies, stream_events, queued_events, [*threads, queued]


def test_requests_left_at_the_deadline_end_with_errors(serve):
    s = serve("--drain-timeout", "1", "--max-batch", "2")
    replies, stream_events, queued_events, threads = _two_running_one_queued(s)
    t0 = time.time()
    s.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(30)
    assert s.proc.wait(timeout=20) == 0
    assert time.time() - t0 < 15
    plain = replies["plain"]
    assert plain.status_code == 503 and plain.json()["error"]["code"] == "server_shutting_down"
    assert "drain timeout of 1 s" in plain.json()["error"]["message"]
    # the started stream: its tokens, then an error event, then [DONE]
    assert stream_events[0] == 200 and stream_events[-1] == "[DONE]"
    assert json.loads(stream_events[-2])["error"]["code"] == "server_shutting_down"
    # the queued stream had not started: a plain 503 in the error shape
    assert queued_events[0] == 503


def test_a_second_signal_ends_every_request_at_once_with_the_drain_errors(serve):
    # The drain would wait 60 s; the second SIGTERM ends it at once, and every request left gets what
    # the drain deadline gives: a running plain request a 503, a running stream an error event and
    # [DONE], a queued stream a 503 (never a 500, a cut stream or a plain-text body).
    s = serve("--drain-timeout", "60", "--max-batch", "2")
    replies, stream_events, queued_events, threads = _two_running_one_queued(s)
    s.proc.send_signal(signal.SIGTERM)
    assert wait_for(lambda: s.get("/ready").status_code == 503, 5)
    t0 = time.time()
    s.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(30)
    assert s.proc.wait(timeout=20) == 0
    assert time.time() - t0 < 10  # not the 60 s drain
    plain = replies["plain"]
    assert plain.status_code == 503 and plain.headers["content-type"] == "application/json"
    assert plain.json()["error"]["code"] == "server_shutting_down" and int(plain.headers["Retry-After"]) > 0
    assert stream_events[0] == 200 and stream_events[-1] == "[DONE]"
    assert json.loads(stream_events[-2])["error"]["code"] == "server_shutting_down"
    assert all("error" not in json.loads(e) for e in stream_events[1:-2])
    assert queued_events[0] == 503
