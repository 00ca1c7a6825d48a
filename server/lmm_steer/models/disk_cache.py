"""A directory built once on disk and shared by every process that needs it.

Two replicas on one volume, or a server and a test, may both find the cache empty at start. The
first to take the lock builds into a temporary sibling and renames it into place; the others wait
on the lock and then find it complete. A complete directory that appears by other means while we
build (a process that took no lock) is accepted as it is.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    """Where lmm-steer keeps what it builds once: $LMM_STEER_CACHE, else $XDG_CACHE_HOME/lmm-steer,
    else ~/.cache/lmm-steer."""
    root = os.environ.get("LMM_STEER_CACHE")
    return Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lmm-steer"


def build_once(target: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """Make sure ``target/marker`` exists, calling ``build(tmp_dir)`` to fill a fresh directory
    at most once across processes; returns ``target``."""
    target = Path(target)
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if (target / marker).exists():  # built by another process while this one waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            build(tmp)
            if target.exists() and not (target / marker).exists():
                shutil.rmtree(target)  # left half-written by a process that died without the lock
            try:
                os.replace(tmp, target)
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not (target / marker).exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
