"""Exclusive locks on outputs, so that two runs never write the same output at once.

On a local filesystem the lock is an OS file lock (`flock`, through zc.lockfile, as DVC uses) on `<output>.lock`,
which also records the holder's pid and host. The OS releases it when the holder exits, however it exits, so a
lock file left by a killed run is stale by construction and the next run simply takes it.

An object store has no flock, but S3 (AWS, MinIO, and S3-compatible servers that implement conditional writes)
creates an object only if it is absent (`If-None-Match: *`) and replaces one only if it is unchanged (`If-Match`).
The lock is then the object `<prefix>.lock`, created that way, holding its holder's host, pid and a heartbeat time
that the holder refreshes every LOCK_HEARTBEAT_S seconds while it runs. A second run stops at once, naming the
holder. A lock whose holder ran on this host under a pid that no longer exists is a killed run's, and the next run
takes it over at once; for a holder on another machine nothing tells a killed holder from a slow one but time: a
lock not refreshed for LOCK_STALE_AFTER_S seconds is stale, and the next run takes it over (either way a
conditional replace, so two runs cannot both take it). The heartbeat is
the holder's clock, so the machines' clocks must agree to well within that timeout (NTP does). A holder that could
not refresh its lock for that long, and finds it taken over, stops.
"""

from __future__ import annotations

import _thread
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import zc.lockfile

from pipeline.core.errors import PipelineError

LOCK_HEARTBEAT_S = 15.0  # how often a holder refreshes its lock object
LOCK_STALE_AFTER_S = 120.0  # a lock object not refreshed for this long is a dead run's, and is taken over

log = logging.getLogger(__name__)


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


@contextmanager
def object_lock(fs: Any, root: str, target: str) -> Iterator[None]:
    """Hold the lock object `<root>.lock` of an S3 prefix (`fs`: an s3fs filesystem) for the block, refreshing it
    on a thread; `target` names the prefix in messages."""
    lock = _ObjectLock(fs, f"{root}.lock", target)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


class _ObjectLock:
    def __init__(self, fs: Any, path: str, target: str) -> None:
        self.fs, self.path, self.target = fs, path, target
        self.etag: str | None = None
        self.stopped = threading.Event()
        self.lost = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name="lock-heartbeat")
        self.previous_handler: Any = None

    def acquire(self) -> None:
        try:
            self.etag = self.fs.pipe_file(self.path, self._record(), mode="create")["ETag"]
        except FileExistsError:
            self._take_over_if_stale()
        self._make_stoppable()
        self.thread.start()

    def _make_stoppable(self) -> None:
        """A run started with SIGINT ignored (`nohup ... &`: background jobs ignore it) has no Python SIGINT
        handler, and the heartbeat's interrupt_main would do nothing: for the lock's lifetime, a handler that
        stops the run once the lock is lost and otherwise ignores SIGINT as before."""
        in_main = threading.current_thread() is threading.main_thread()
        if not in_main or signal.getsignal(signal.SIGINT) != signal.SIG_IGN:
            return

        def stop_if_lost(signum: int, frame: Any) -> None:
            if self.lost.is_set():
                raise KeyboardInterrupt

        self.previous_handler = signal.signal(signal.SIGINT, stop_if_lost)

    def release(self) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join()
        if self.previous_handler is not None:
            signal.signal(signal.SIGINT, self.previous_handler)
        bucket, key, _ = self.fs.split_path(self.path)
        try:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=self.etag)
        except OSError as exc:
            if not _precondition_failed(exc):
                raise  # it is ours, and could not be removed: the next run must not wait for it to go stale
            log.warning("%s: the lock had already been taken over by another run", self.target)

    def _take_over_if_stale(self) -> None:
        etag = self.fs.info(self.path)["ETag"]  # before the content: the content is then at least as new
        holder = json.loads(self.fs.cat_file(self.path))
        age = time.time() - holder["heartbeat"]
        who = f"pid {holder['pid']} on host {holder['host']}, lock object s3://{self.path}"
        gone = holder["host"] == socket.gethostname() and not psutil.pid_exists(holder["pid"])
        if age <= LOCK_STALE_AFTER_S and not gone:
            raise PipelineError(
                f"{self.target} is being written by another run ({who}, alive {max(age, 0):.0f} s ago); wait for it "
                f"to finish or stop it (a lock not refreshed for {LOCK_STALE_AFTER_S:.0f} s is taken over)"
            )
        try:
            self.etag = self._replace(etag)
        except OSError as exc:
            if _precondition_failed(exc):
                raise PipelineError(f"{self.target}: another run took over its stale lock first ({who})") from None
            raise
        why = "is no longer running" if gone else f"stopped refreshing it {age:.0f} s ago"
        log.warning("%s: took over the lock of a run that %s (%s)", self.target, why, who)

    def _beat(self) -> None:
        while not self.stopped.wait(LOCK_HEARTBEAT_S):
            try:
                self.etag = self._replace(self.etag)
            except OSError as exc:
                if _precondition_failed(exc):  # taken over: another run now writes here, this one must stop
                    log.error(
                        "%s: another run took over the lock (this one could not refresh it): stopping", self.target
                    )
                    self.lost.set()
                    _thread.interrupt_main()
                    return
                log.warning("%s: could not refresh the lock (%s); trying again", self.target, exc)

    def _replace(self, etag: str | None) -> str:
        """Write a fresh heartbeat over the lock object, only if it is still the version `etag`."""
        return self.fs.pipe_file(self.path, self._record(), IfMatch=etag)["ETag"]

    @staticmethod
    def _record() -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}).encode()


def _precondition_failed(exc: BaseException) -> bool:
    """Whether an S3 error is a conditional write's condition not holding (s3fs keeps the botocore error as cause)."""
    cause = getattr(exc.__cause__, "response", None) or {}
    return cause.get("Error", {}).get("Code") == "PreconditionFailed"
