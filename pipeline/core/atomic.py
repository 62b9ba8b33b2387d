"""Safe writes: a file appears under its final name only when it is complete, and nothing of a user's is replaced.

Temporary siblings are named `.<name>.tmp-<pid>` (being written) and `.<name>.old-<pid>` (a previous version
being swapped out); a run killed mid-write leaves them behind, and the next write to the same name removes those
whose process is gone.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.core.errors import DamagedFile, PipelineError, first_line

Owned = Callable[[Path], bool]  # "this existing directory is one we wrote, and may be replaced"


@contextmanager
def atomic_path(path: str | Path, owned: Owned | None = None) -> Iterator[Path]:
    """Yield a temporary sibling path (file or directory) to write; it replaces `path` only if the block succeeds.

    A directory written this way replaces an existing `path` only when `owned(path)` says it is ours (or it is
    empty): a directory holding anything else is refused before any work is done.
    """
    path = Path(path)
    check_replaceable(path, owned)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_litter(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if tmp.is_dir():
            replace_dir(tmp, path, owned)
        else:
            os.replace(tmp, path)
    finally:
        _remove(tmp)


def check_replaceable(path: Path, owned: Owned | None) -> None:
    """Refuse (naming `path`) to replace a directory that is neither empty nor recognised by `owned`."""
    if not path.is_dir():
        return
    if owned is None or not (owned(path) or not any(path.iterdir())):
        raise PipelineError(
            f"{path} is an existing directory that this pipeline did not write; refusing to replace it "
            "(choose another output path, or move it away)"
        )


def replace_dir(src: Path, dst: Path, owned: Owned | None) -> None:
    """Move a finished directory onto `dst`, replacing a previous one of ours (never anything else).

    A crash between the two renames leaves `dst` absent and the complete new data still under `src`: calling
    this again finishes the swap (the store does so on its next run).
    """
    check_replaceable(dst, owned)
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    _remove(old)


def remove_litter(path: Path) -> list[Path]:
    """Remove `.tmp-`/`.old-` siblings of `path` left by processes that no longer run; returns what was removed."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?:tmp|old)-(\d+)$")
    removed = []
    if path.parent.is_dir():
        for sibling in path.parent.iterdir():
            match = pattern.match(sibling.name)
            if match and not process_alive(int(match.group(1))):
                _remove(sibling)
                removed.append(sibling)
    return removed


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM  # it exists, but belongs to another user
    return True


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_text(path: str | Path, text: str) -> None:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_torch(obj: dict[str, Any], path: str | Path, previous: Path | None = None) -> None:
    """torch.save atomically: a failed save (disk full) leaves the previous file intact.

    `previous`: where the file being replaced is kept, once the new one is completely written (one version back).
    torch reports a failed write (e.g. a full disk) as a RuntimeError from its zip writer; it is an environment
    fault, not a bug, so it becomes an OSError naming the file.
    """
    import torch  # here, not at the top: the CLI and the report use this module without needing torch

    path = Path(path)
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as exc:
            raise OSError(f"could not write {path}: {first_line(exc)}") from exc
        if previous is not None and path.is_file():
            os.replace(path, previous)


def load_torch(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint without unpickling arbitrary objects; one that cannot be read is a DamagedFile error."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as exc:
        raise DamagedFile(f"{path} is damaged and cannot be read ({type(exc).__name__}: {first_line(exc)})") from exc


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)
