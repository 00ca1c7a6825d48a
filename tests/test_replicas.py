"""Two replicas of the default model behind a real HAProxy (Debian's package), configured by
deploy/haproxy/haproxy.cfg as it is (only its addresses and ports replaced), health-checked on
/ready, under steady traffic from the SDK (streamed and not, text and images, greedy, so every
answer is checked against the one the same request got before):

- a rolling restart (SIGTERM one replica while it is working, wait for it to exit, start it again,
  wait until the balancer sends it work, then the other): every request completes once, with the
  right answer; the caller sees no failure (a refusal while draining is retried by the balancer or,
  with its Retry-After, by the SDK);
- one replica SIGKILLed while it is working: the only failures are streams that were running on it
  and had already passed a token to the caller (a stream is not retried after its first token);
  every non-streamed request completes with the right answer.

A couple of minutes on two CPU cores, most of it the replicas' starts.
"""

import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from lmm_steer_client import APIConnectionError, Client
from servers import Server, free_port, wait_for

HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")  # sbin: not on every PATH
pytestmark = pytest.mark.skipif(
    HAPROXY is None, reason="needs Debian's haproxy package: .ci/run installs it with apt-get, which failed here")
CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "haproxy" / "haproxy.cfg"
# One row per decode step: a greedy answer is then computed the same way on either replica, whatever
# else runs beside it (rows batched together could round differently and flip a near tie).
REPLICA_ARGS = ("--max-batch", "1", "--default-max-tokens", "8", "--drain-timeout", "30")
WORKERS = 3


def balancer_config(lb_port: int, stats_port: int, replica_ports: list[int]) -> str:
    """deploy/haproxy/haproxy.cfg with its bind and server addresses on loopback ports."""
    text = CONFIG.read_text()
    text, n_lb = re.subn(r"(?m)^(\s*bind )\*?:8000$", rf"\g<1>127.0.0.1:{lb_port}", text)
    text, n_stats = re.subn(r"(?m)^(\s*bind )\*?:8404$", rf"\g<1>127.0.0.1:{stats_port}", text)
    for i, port in enumerate(replica_ports, 1):
        text, n = re.subn(rf"(?m)^(\s*server replica{i} )\S+", rf"\g<1>127.0.0.1:{port}", text)
        assert n == 1, f"{CONFIG} has no 'server replica{i}' line"
    assert n_lb == n_stats == 1, f"{CONFIG}: expected one 'bind :8000' and one 'bind :8404'"
    return text


class Balancer:
    def __init__(self, tmp_path: Path, replica_ports: list[int]) -> None:
        self.port, self.stats_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(balancer_config(self.port, self.stats_port, replica_ports))
        check = subprocess.run([HAPROXY, "-c", "-f", str(cfg)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)

    def status(self) -> dict[str, str]:
        """Each replica's state as the balancer sees it (UP, DOWN, ...)."""
        try:
            rows = httpx.get(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=5).text.splitlines()
        except httpx.HTTPError:
            return {}
        header = rows[0].lstrip("# ").split(",")
        out = {}
        for row in rows[1:]:
            cells = dict(zip(header, row.split(","), strict=False))
            if cells.get("pxname") == "replicas" and cells.get("svname", "").startswith("replica"):
                out[cells["svname"]] = cells["status"]
        return out

    def wait_up(self, name: str, timeout: float = 30) -> None:
        assert wait_for(lambda: self.status().get(name) == "UP", timeout), self.status()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@dataclass(frozen=True)
class Job:
    prompt: str
    image: bytes | None = None
    stream: bool = False

    def kw(self) -> dict:
        return {"prompt": self.prompt, "images": [self.image] if self.image else [], "max_tokens": 6,
                "temperature": 0}


@dataclass
class Outcome:
    job: Job
    started: float
    ended: float
    text: str | None = None
    error: Exception | None = None
    tokens_seen: int = 0


@dataclass
class Traffic:
    """Workers sending jobs in a loop through the SDK (retries on, as a caller has them)."""

    url: str
    jobs: list[Job]
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    retries: int = 0

    def start(self) -> None:
        self.threads = [threading.Thread(target=self._work, args=(i,), daemon=True) for i in range(WORKERS)]
        for t in self.threads:
            t.start()

    def finish(self) -> list[Outcome]:
        self.stop.set()
        for t in self.threads:
            t.join(120)
        assert not any(t.is_alive() for t in self.threads), "a request never returned"
        return self.outcomes

    def _work(self, worker: int) -> None:
        with Client(self.url, timeout=120, retry_budget=60) as client:
            n = worker
            while not self.stop.is_set():
                job = self.jobs[n % len(self.jobs)]
                n += WORKERS
                outcome = Outcome(job, time.monotonic(), 0.0)
                try:
                    if job.stream:
                        parts = []
                        for delta in client.chat(stream=True, **job.kw()):
                            parts.append(delta)
                            outcome.tokens_seen += 1
                        outcome.text = "".join(parts)
                    else:
                        outcome.text = client.chat(**job.kw()).text
                except Exception as e:  # noqa: BLE001 - recorded, judged by the test
                    outcome.error = e
                outcome.ended = time.monotonic()
                self.outcomes.append(outcome)
            self.retries += client.retries_made


def _start_replicas(ports: list[int]) -> list[Server]:
    started: dict[int, Server] = {}
    errors = []

    def start(port):
        try:
            started[port] = Server(*REPLICA_ARGS, port=port, ready_timeout=240)
        except Exception as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=start, args=(p,)) for p in ports]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for s in started.values():
            s.stop()
        raise errors[0]
    return [started[p] for p in ports]


def _busy(server: Server) -> bool:
    try:
        return server.metric("lmm_steer:num_requests_running") >= 1
    except httpx.HTTPError:
        return False


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    # one compute thread per replica: two replicas on a small machine would otherwise oversubscribe it
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ports = [free_port(), free_port()]
    replicas = _start_replicas(ports)
    balancer = Balancer(tmp_path, ports)
    yield replicas, balancer
    balancer.stop()
    for s in replicas:
        s.stop()


def _check(outcomes: list[Outcome], expected: dict[Job, str]) -> list[Outcome]:
    """The failed outcomes; every one that completed has the right answer."""
    wrong = [(o.job.prompt, o.job.stream, o.text, expected[o.job]) for o in outcomes
             if o.error is None and o.text != expected[o.job]]
    assert not wrong, wrong
    return [o for o in outcomes if o.error is not None]


def test_rolling_restart_and_a_killed_replica_lose_no_request(cluster):
    replicas, balancer = cluster
    balancer.wait_up("replica1")
    balancer.wait_up("replica2")
    with Client(balancer.url) as client:
        scenes = [client.scene(seed=11, index=i) for i in (3, 4)]
        jobs = [Job(scene.questions[0]["prompt"], scene.png, stream) for scene in scenes for stream in (False, True)]
        jobs += [Job(prompt, None, stream) for prompt in ("What colour is the circle? Answer in a word or a short phrase.",
                                                          "How many shapes are there?", "Is there a star?")
                 for stream in (False, True)]
        # each job's answer, asked once before anything happens (streamed or not, the same greedy text)
        expected = {job: client.chat(**job.kw()).text for job in jobs}
    assert all(expected.values())

    # -- a rolling restart under load ---------------------------------------------------------
    traffic = Traffic(balancer.url, jobs)
    traffic.start()
    for i, name in enumerate(("replica1", "replica2")):
        old = replicas[i]
        assert wait_for(lambda old=old: _busy(old), 60), "the replica never got work"
        old.proc.send_signal(signal.SIGTERM)  # while it runs a request
        assert wait_for(lambda old=old: old.get("/ready").status_code == 503, 5)  # unready from the drain's start
        assert old.proc.wait(timeout=60) == 0
        old.log.close()
        replicas[i] = Server(*REPLICA_ARGS, port=old.port, ready_timeout=240)
        balancer.wait_up(name)
    rolling = traffic.finish()
    failures = _check(rolling, expected)
    assert not failures, [(o.job.prompt, o.job.stream, repr(o.error)) for o in failures]
    assert len(rolling) >= 20 and {o.job.stream for o in rolling} == {False, True}

    # -- one replica killed mid-load -------------------------------------------------------------
    traffic = Traffic(balancer.url, jobs)
    traffic.start()
    victim = replicas[1]
    assert wait_for(lambda: _busy(victim), 60), "the replica never got work"
    killed_at = time.monotonic()
    victim.proc.kill()
    victim.proc.wait(timeout=10)
    after = len(traffic.outcomes)
    assert wait_for(lambda: len(traffic.outcomes) >= after + 3 * WORKERS, 90), "traffic stalled after the kill"
    killed = traffic.finish()
    failures = _check(killed, expected)
    # only requests in flight on the killed replica failed (one at most: it ran one row, and a request
    # waiting there had sent nothing to its caller, so it was retried), and only a stream past its
    # first token: a non-streamed request, or a stream before its first token, was retried
    assert len(failures) <= 1, [(o.job.prompt, o.job.stream, repr(o.error)) for o in failures]
    for o in failures:
        assert o.job.stream and o.tokens_seen >= 1 and o.started < killed_at < o.ended
        assert isinstance(o.error, APIConnectionError) and "after its first token" in str(o.error)
    completed_after = [o for o in killed if o.error is None and o.started > killed_at]
    assert {o.job.stream for o in completed_after} == {False, True}  # the survivor serves both kinds
