"""The SDK's retry policy, against an HTTP-level test double (no server, no clock: waits are recorded,
not slept): which failures are retried and for which calls, how often, how long it waits (Retry-After
honoured, jittered backoff otherwise), the budget, the off switch, and streams never retried after
their first token."""

import asyncio
import json

import httpx
import pytest
from lmm_steer_client import (
    APIConnectionError,
    AsyncClient,
    BadRequestError,
    Client,
    NotFoundError,
    RateLimitError,
    ServerError,
)

CHAT_BODY = {"id": "chatcmpl-1", "choices": [{"message": {"role": "assistant", "content": "yellow"},
                                              "finish_reason": "stop"}],
             "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
BODIES = {
    "/v1/chat/completions": CHAT_BODY,
    "/v1/features": {"object": "list", "query": "x", "data": [{"id": 3, "explanation": "x", "score": 1.0}]},
    "/v1/features/3": {"id": 3, "explanation": "x", "stats": {}},
    "/v1/inspect": {"object": "inspection", "positions": []},
    "/v1/models": {"object": "list", "data": [{"id": "m"}]},
    "/v1/scenes": {"seed": 1, "index": 0, "image": "data:image/png;base64,AA==", "caption": "c"},
    "/v1/steering/suggest": {"object": "steering.suggestion", "edits": []},
}
# every call of the SDK: chat without streaming, search, inspect, and the other reads
CALLS = {
    "chat": lambda c: c.chat(prompt="hi", max_tokens=2),
    "search": lambda c: c.features.search("x"),
    "inspect": lambda c: c.inspect(prompt="hi"),
    "feature": lambda c: c.features.get(3),
    "models": lambda c: c.models(),
    "scene": lambda c: c.scene(seed=1),
    "suggest": lambda c: c.suggest("the sea"),
}


def error(status, code=None, headers=None):
    return httpx.Response(status, headers=headers or {},
                          json={"error": {"message": f"status {status}", "type": "t", "param": None, "code": code}})


class Script:
    """Answers requests from a list of failures (a Response, or an exception to raise), then the
    success for the path; records each request's path."""

    def __init__(self, *failures):
        self.failures, self.paths = list(failures), []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        if self.failures:
            failure = self.failures.pop(0)
            if isinstance(failure, Exception):
                raise failure
            return failure
        return httpx.Response(200, json=BODIES[request.url.path])


def client(script, **kw) -> Client:
    c = Client("http://test", transport=httpx.MockTransport(script), **kw)
    c.waits = []
    c._sleep = c.waits.append  # record the waits instead of sleeping
    return c


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("failure", [error(429, "queue_full", {"Retry-After": "2"}),
                                     error(503, "server_shutting_down", {"Retry-After": "5"}),
                                     error(503), error(502), error(504),
                                     httpx.ConnectError("refused"), httpx.ReadError("reset by peer"),
                                     httpx.RemoteProtocolError("closed without a response")],
                         ids=["429", "503-draining", "503-balancer", "502", "504", "refused", "reset", "closed"])
def test_every_call_is_retried_after_a_failure_that_says_the_server_did_not_answer(call, failure):
    script = Script(failure, failure)
    with client(script) as c:
        CALLS[call](c)  # no exception: the third attempt succeeded
        assert len(script.paths) == 3 and len(set(script.paths)) == 1 and c.retries_made == 2


@pytest.mark.parametrize("failure,raised", [
    (error(400, "invalid_value"), BadRequestError), (error(404), NotFoundError), (error(500, "internal_error"), ServerError),
    (httpx.ReadTimeout("slow"), APIConnectionError), (httpx.UnsupportedProtocol("ftp"), APIConnectionError)],
    ids=["400", "404", "500", "read-timeout", "unsupported"])
def test_other_failures_are_raised_at_once(failure, raised):
    script = Script(failure)
    with client(script) as c, pytest.raises(raised):
        c.chat(prompt="hi")
    assert len(script.paths) == 1 and c.waits == []


def test_retry_after_is_honoured_with_jitter_above_it():
    script = Script(*[error(429, "queue_full", {"Retry-After": "2"})] * 3)
    with client(script, max_retries=3) as c:
        assert c.chat(prompt="hi").text == "yellow"
    assert len(c.waits) == 3 and all(2 <= w <= 2.5 for w in c.waits)


def test_retry_after_as_an_http_date():
    from datetime import UTC, datetime, timedelta
    from email.utils import format_datetime

    when = format_datetime(datetime.now(UTC) + timedelta(seconds=20), usegmt=True)
    script = Script(error(503, headers={"Retry-After": when}))
    with client(script) as c:
        c.models()
    assert 17 <= c.waits[0] <= 25  # about 20 s from now, plus at most a quarter


def test_backoff_without_retry_after_doubles_is_capped_and_jittered():
    script = Script(*[error(502)] * 6)
    with client(script, max_retries=6, backoff=1.0, max_backoff=4.0, retry_budget=100) as c:
        c.models()
    bounds = [1, 2, 4, 4, 4, 4]
    assert len(c.waits) == 6 and all(b / 2 <= w <= b for w, b in zip(c.waits, bounds, strict=True))


def test_the_budget_bounds_retries_by_count_and_by_waiting():
    script = Script(*[error(503)] * 10)
    with client(script, max_retries=3) as c, pytest.raises(ServerError) as info:
        c.models()
    assert info.value.status == 503 and len(script.paths) == 4  # the first try and three retries
    # a Retry-After beyond the budget is not waited for: the error comes back at once
    script = Script(error(429, "queue_full", {"Retry-After": "60"}))
    with client(script, retry_budget=30) as c, pytest.raises(RateLimitError):
        c.models()
    assert len(script.paths) == 1 and c.waits == []
    # waits add up to the budget at most
    script = Script(*[error(429, "queue_full", {"Retry-After": "10"})] * 5)
    with client(script, max_retries=5, retry_budget=30) as c, pytest.raises(RateLimitError):
        c.models()
    assert 1 <= len(c.waits) <= 2 and sum(c.waits) <= 30


def test_retries_are_off_by_a_flag():
    script = Script(error(503, headers={"Retry-After": "1"}))
    with client(script, retry=False) as c, pytest.raises(ServerError):
        c.chat(prompt="hi")
    assert len(script.paths) == 1 and c.waits == [] and c.retries_made == 0


# -- streams ------------------------------------------------------------------------------------

def sse(*events, done=True) -> list[bytes]:
    out = [f"data: {json.dumps(e)}\n\n".encode() for e in events]
    return out + ([b"data: [DONE]\n\n"] if done else [])


def chunk(text=None, finish=None):
    delta = {"content": text} if text is not None else {"role": "assistant", "content": ""}
    return {"id": "c", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


SHUTDOWN_EVENT = {"error": {"message": "shutting down", "type": "server_error", "param": None,
                            "code": "server_shutting_down"}}


class Body(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body sent in pieces, then cut (``cut``: the exception raised after them)."""

    def __init__(self, pieces, cut=None):
        self.pieces, self.cut = pieces, cut

    def __iter__(self):
        yield from self.pieces
        if self.cut:
            raise self.cut

    async def __aiter__(self):
        for piece in self.pieces:
            yield piece
        if self.cut:
            raise self.cut


def stream(pieces, cut=None):
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=Body(pieces, cut))


WHOLE = sse(chunk(), chunk("yel"), chunk("low"), chunk(finish="stop"))


@pytest.mark.parametrize("failure", [
    error(503, "server_shutting_down", {"Retry-After": "5"}), error(429, "queue_full", {"Retry-After": "1"}), error(502),
    httpx.ConnectError("refused"),
    stream(sse(chunk()), cut=httpx.RemoteProtocolError("cut")),  # cut after the role chunk: no token yet
    stream(sse(chunk(), SHUTDOWN_EVENT)),  # the drain ended it before its first token
], ids=["503", "429", "502", "refused", "cut-before-first-token", "shutdown-event-before-first-token"])
def test_a_stream_is_retried_until_its_first_token(failure):
    script = Script(failure, stream(WHOLE))
    with client(script) as c:
        s = c.chat(prompt="hi", stream=True)
        assert list(s) == ["yel", "low"] and s.result.text == "yellow"
    assert len(script.paths) == 2 and c.retries_made == 1


@pytest.mark.parametrize("failure,raised,code", [
    (stream(sse(chunk(), chunk("yel")), cut=httpx.RemoteProtocolError("cut")), APIConnectionError, None),
    (stream(sse(chunk(), chunk("yel"), SHUTDOWN_EVENT)), ServerError, "server_shutting_down"),
], ids=["cut-after-first-token", "shutdown-event-after-first-token"])
def test_a_stream_is_never_retried_after_its_first_token(failure, raised, code):
    script = Script(failure)
    with client(script) as c:
        got = []
        with pytest.raises(raised) as info:
            for delta in c.chat(prompt="hi", stream=True):
                got.append(delta)
    assert got == ["yel"] and len(script.paths) == 1 and c.waits == []
    assert getattr(info.value, "code", None) == code
    if raised is APIConnectionError:
        assert "after its first token" in str(info.value)


def test_a_stream_without_retries_raises_the_first_failure():
    script = Script(error(503, headers={"Retry-After": "1"}))
    with client(script, retry=False) as c, pytest.raises(ServerError):
        list(c.chat(prompt="hi", stream=True))
    assert len(script.paths) == 1


# -- the async client: the same policy ------------------------------------------------------------

def test_async_client_retries_the_same_way():
    async def run():
        script = Script(error(429, "queue_full", {"Retry-After": "2"}), httpx.ReadError("reset"))
        waits = []
        async with AsyncClient("http://test", transport=httpx.MockTransport(script)) as c:
            async def record(seconds):
                waits.append(seconds)

            c._sleep = record
            assert (await c.chat(prompt="hi")).text == "yellow"
            assert len(script.paths) == 3 and 2 <= waits[0] <= 2.5
            # a stream: retried before its first token, not after
            ok = Script(error(503), stream(WHOLE))
            c._http = httpx.AsyncClient(base_url="http://test", transport=httpx.MockTransport(ok))
            assert [d async for d in c.chat_stream(prompt="hi")] == ["yel", "low"] and len(ok.paths) == 2
            cut = Script(stream(sse(chunk(), chunk("yel")), cut=httpx.ReadError("reset")))
            c._http = httpx.AsyncClient(base_url="http://test", transport=httpx.MockTransport(cut))
            got = []
            with pytest.raises(APIConnectionError):
                async for d in c.chat_stream(prompt="hi"):
                    got.append(d)
            assert got == ["yel"] and len(cut.paths) == 1
            # off by the flag
            c.retry = False
            off = Script(error(503))
            c._http = httpx.AsyncClient(base_url="http://test", transport=httpx.MockTransport(off))
            with pytest.raises(ServerError):
                await c.scene(seed=1)
            assert len(off.paths) == 1

    asyncio.run(run())
