"""The bridge between async HTTP handlers and the engine, which runs on a thread of its own.

Handlers prepare a request (validation, tokenisation, image processing) on a worker thread, hand
it to the engine thread, and read its token events from an asyncio queue. Everything that touches
the model (decode steps, inspect, feature statistics) happens on the engine thread, one thing at a
time. Neither side sees the other's internals: handlers see dataclasses and plain data.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from sae_weights import FeatureCatalog

from .engine import Engine, GenerationRequest, GenerationResult, TokenEvent

log = logging.getLogger("lmm_steer.service")


class QueueFull(Exception):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__("the server's request queue is full; retry later")
        self.retry_after_s = retry_after_s


class RequestFailed(Exception):
    """The engine failed this request (it keeps serving the others). ``code`` says why: the
    engine's ``internal_error`` or ``non_finite_output``, or ``SHUTTING_DOWN``."""

    def __init__(self, message: str, code: str = "internal_error") -> None:
        super().__init__(message)
        self.code = code


SHUTTING_DOWN = "server_shutting_down"


@dataclass
class _Finished:
    result: GenerationResult


@dataclass
class _Failed:
    message: str
    code: str


class SteeringService:
    def __init__(self, engine: Engine, *, catalog: FeatureCatalog | None = None, max_queue: int = 256,
                 model_name: str | None = None, metrics=None, prepare_workers: int = 2) -> None:
        self.engine = engine
        self.catalog = catalog or FeatureCatalog()
        self.max_queue = max_queue
        self.model_name = model_name or engine.loaded.name
        self.metrics = metrics
        self._channels: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._jobs: list[tuple[Callable, Future]] = []
        self._aborts: set[str] = set()
        self._preparing = 0
        self._generating = 0  # generation requests admitted and not yet answered, in any state
        self._calls = 0  # model work from handlers (inspect) not yet answered
        self._last_token: dict[str, float] = {}  # for inter-token latency
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lmm-steer-engine", daemon=True)
        # Tokenising and image processing run here, off the event loop; a few workers at most, so a
        # burst of large prompts queues instead of holding many of them in memory at once.
        self._prepare_pool = ThreadPoolExecutor(max_workers=prepare_workers, thread_name_prefix="lmm-steer-prepare")
        self.ready = False
        self.draining = False  # set when shutdown begins: no new requests are admitted
        self._closed = False  # set when the drain's deadline passes: everything left is failed
        self.decoder_norms: list[float] | None = None
        self.concepts = None  # a concepts.semantic.SemanticIndex over the catalog: search by meaning

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        if self.engine.sae is not None:
            from .engine.inspect import decoder_norms

            self.decoder_norms = self.call_sync(lambda e: decoder_norms(e.sae))
        self.ready = True

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet answered: preparing, queued or decoding."""
        return len(self._channels) + self._preparing + self._calls

    def fail_all(self, message: str, code: str = SHUTTING_DOWN) -> int:
        """End every request in flight with an error (the drain's deadline passed); returns how many."""
        self._closed = True
        channels = list(self._channels.items())
        for rid, (loop, queue) in channels:
            loop.call_soon_threadsafe(queue.put_nowait, _Failed(message, code))
            self.abort(rid)
        return len(channels)

    # -- state ------------------------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self.engine.active)

    @property
    def waiting(self) -> int:
        """Generation requests admitted that hold no batch row yet: preparing, queued or in prefill."""
        return max(0, self._generating - len(self.engine.active))

    @property
    def capacity(self) -> int:
        """Generation requests admitted at most at once: ``max_batch`` running plus ``max_queue`` waiting."""
        return self.engine.config.max_batch + self.max_queue

    def search(self, query: str, limit: int):
        """Catalog entries for ``query``: by meaning and words where the index exists, else by words."""
        if self.concepts is not None:
            return self.concepts.search(query, limit)
        return self.catalog.search(query, limit)

    @property
    def num_latents(self) -> int | None:
        return self.engine.sae.num_latents if self.engine.sae is not None else None

    # -- generation -------------------------------------------------------------------------

    async def generate(self, req: GenerationRequest, *, bounded: bool = True) -> AsyncIterator[TokenEvent | GenerationResult]:
        """Validate and queue ``req`` (raising EngineError or QueueFull before anything is
        yielded), then yield its token events and finally its result. Closing the iterator early
        (a client went away) aborts the request and frees its row.

        The queue bound counts admitted requests, whatever state each is in (preparing, queued, in
        prefill, decoding) and however it is answered (streamed or not): at most ``capacity``
        (``max_batch`` + ``max_queue``) at once, the rest get QueueFull. ``bounded=False`` admits
        past it, for the unsteered twin of a request already admitted (it still counts)."""
        with self._lock:
            if bounded and self._generating >= self.capacity:
                waiting = self._generating - self.engine.config.max_batch
                raise QueueFull(retry_after_s=max(1, waiting // max(1, self.engine.config.max_batch)))
            self._generating += 1
            self._preparing += 1
        try:
            loop = asyncio.get_running_loop()
            try:
                seq = await loop.run_in_executor(self._prepare_pool, self.engine.prepare, req)
            finally:
                with self._lock:
                    self._preparing -= 1
            if self._closed:  # prepared after the drain's deadline ended everything else
                raise RequestFailed("the server is shutting down", SHUTTING_DOWN)
            rid = seq.req.request_id
            queue: asyncio.Queue = asyncio.Queue()
            self._channels[rid] = (loop, queue)
            self.engine.enqueue(seq)
            self._wake.set()
            done = False
            try:
                while True:
                    item = await queue.get()
                    if isinstance(item, _Finished):
                        done = True
                        yield item.result
                        return
                    if isinstance(item, _Failed):
                        done = True
                        raise RequestFailed(item.message, item.code)
                    yield item
            finally:
                self._channels.pop(rid, None)
                if not done:
                    self.abort(rid)
        finally:
            with self._lock:
                self._generating -= 1

    async def complete(self, req: GenerationRequest, *, bounded: bool = True) -> GenerationResult:
        result = None
        async for item in self.generate(req, bounded=bounded):
            if isinstance(item, GenerationResult):
                result = item
        return result

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.add(request_id)
        self._wake.set()

    # -- model work on the engine thread -------------------------------------------------------

    def call_sync(self, fn: Callable[[Engine], object]) -> object:
        future: Future = Future()
        with self._lock:
            self._jobs.append((fn, future))
        self._wake.set()
        return future.result()

    async def call(self, fn: Callable[[Engine], object]) -> object:
        future: Future = Future()
        with self._lock:
            self._jobs.append((fn, future))
            self._calls += 1
        self._wake.set()
        try:
            return await asyncio.wrap_future(future)
        finally:
            with self._lock:
                self._calls -= 1

    # -- the engine thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                jobs, self._jobs = self._jobs, []
                aborts, self._aborts = self._aborts, set()
            for fn, future in jobs:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(self.engine))
                    except Exception as e:  # noqa: BLE001 - handed to the caller
                        future.set_exception(e)
            for rid in aborts:
                self._last_token.pop(rid, None)
                if self.engine.abort(rid) and self.metrics is not None:
                    self.metrics.on_abort()
            if not self.engine.has_work:
                self._wake.wait(timeout=0.05)
                self._wake.clear()
                continue
            try:
                out = self.engine.step()
            except Exception:  # noqa: BLE001 - the engine isolates failures; this is a last resort
                log.exception("engine step failed")
                continue
            now = time.perf_counter()
            for event in out.events:
                last = self._last_token.get(event.request_id)
                if last is not None and self.metrics is not None:
                    self.metrics.on_token_gap(now - last)
                self._last_token[event.request_id] = now
                if event.finished:
                    self._last_token.pop(event.request_id, None)
                self._send(event.request_id, event)
            if out.clamp_effects and self.metrics is not None:
                self.metrics.on_clamp_effects(out.clamp_effects)
            for result in out.finished:
                if self.metrics is not None:
                    self.metrics.on_finish(result)
                self._send(result.request_id, _Finished(result))
            for failure in out.failed:  # counted as errors where they are answered (the API)
                self._last_token.pop(failure.request_id, None)
                log.error("request %s failed: %s", failure.request_id, failure.message)
                self._send(failure.request_id, _Failed(failure.message, failure.code))

    def _send(self, request_id: str, item) -> None:
        channel = self._channels.get(request_id)
        if channel is not None:
            loop, queue = channel
            loop.call_soon_threadsafe(queue.put_nowait, item)
