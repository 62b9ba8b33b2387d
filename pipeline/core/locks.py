"""Exclusive locks on outputs, so that two runs never write the same output at once.

The lock is an OS file lock (`flock`, through zc.lockfile, as DVC uses) on `<output>.lock`, which also records
the holder's pid and host. The OS releases it when the holder exits, however it exits, so a lock file left by a
killed run is stale by construction and the next run simply takes it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import zc.lockfile

from pipeline.core.errors import PipelineError


def lock_path(target: Path) -> Path:
    return target.with_name(target.name + ".lock")


@contextmanager
def exclusive_lock(target: str | Path) -> Iterator[None]:
    """Hold the lock on `target` for the block; another holder is an error naming its pid and host."""
    path = lock_path(Path(target))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        lock = zc.lockfile.LockFile(str(path), content_template="pid {pid} on host {hostname}")
    except zc.lockfile.LockError:
        raise PipelineError(
            f"{target} is being written by another run ({_holder(path)}, lock file {path}); wait for it to "
            "finish or stop it"
        ) from None
    try:
        yield
    finally:
        lock.close()


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "holder unknown"
    except OSError:
        return "holder unknown"
