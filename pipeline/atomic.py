"""Atomic writes: a file appears under its final name only when it is complete."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path (file or directory) to write; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if tmp.is_dir():
            replace_dir(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_text(path: str | Path, text: str) -> None:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_torch(obj: dict[str, Any], path: str | Path) -> None:
    """torch.save atomically: a failed save (disk full) leaves the previous file intact."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint without unpickling arbitrary objects."""
    return torch.load(path, map_location="cpu", weights_only=True)


def replace_dir(src: Path, dst: Path) -> None:
    """Move a finished directory onto `dst`, replacing any previous one without a moment of neither."""
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)
