"""Start real ``lmm-steer serve`` processes on loopback for the HTTP tests."""

import os
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args: str, key: str | None = None, port: int | None = None,
                 ready_timeout: float = 120) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = key
        self.log = open(os.devnull, "w")  # noqa: SIM115
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmm_steer.cli", "serve", "--port", str(self.port), "--log-level", "warning", *args],
            stdout=self.log, stderr=subprocess.PIPE, env=env, text=True,
        )
        deadline = time.time() + ready_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()}")
            try:
                if httpx.get(f"{self.url}/ready", headers=self.headers, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not become ready")

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def post(self, path: str, body, **kw):
        return httpx.post(f"{self.url}{path}", json=body, headers={**self.headers, **kw.pop("headers", {})},
                          timeout=kw.pop("timeout", 60), **kw)

    def get(self, path: str, **kw):
        return httpx.get(f"{self.url}{path}", headers={**self.headers, **kw.pop("headers", {})}, timeout=30, **kw)

    def metric(self, name: str) -> float:
        total = 0.0
        for line in self.get("/metrics").text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def wait_for(pred, timeout: float = 10.0) -> bool:
    """Poll ``pred`` until it holds or ``timeout`` seconds pass; whether it held."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False
