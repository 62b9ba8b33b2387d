"""Reading a finished store: opening it checks that it is complete and that every file has its recorded size."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.core.errors import PipelineError
from pipeline.core.location import Location
from pipeline.store.format import (
    FORMAT_VERSION,
    MANIFEST,
    TRUTH_GROUP,
    as_location,
    describe,
    is_complete,
    progress_files,
    shard_file,
)


class ActivationStore:
    """Read access to a finished store; opening it checks that every file is present with its recorded size."""

    def __init__(self, path: str | Path | Location) -> None:
        self.location = as_location(path)
        self.path = str(self.location)  # as given: a local path or a URL
        if not self.location.exists("zarr.json"):
            raise PipelineError(_missing_store_message(self.location))
        try:
            self.group = zarr.open_group(self.location.zarr_store, mode="r", zarr_format=3)
        except Exception as exc:  # an unreadable zarr.json
            raise PipelineError(f"{self.path} is damaged: its zarr.json cannot be read ({exc}); re-extract it") from exc
        self.attrs: dict[str, Any] = dict(self.group.attrs)
        version = self.attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise PipelineError(
                f"{self.path}: store format {version} is not the one this version reads ({FORMAT_VERSION}); "
                "re-extract it with `pipeline extract --force`"
            )
        if MANIFEST not in self.attrs:
            finish = "`pipeline extract --resume` finishes it" if progress_files(self.location) else "re-extract it"
            raise PipelineError(f"{self.path} is incomplete: it has no manifest (written last); {finish}")
        self.manifest: dict[str, dict] = self.attrs[MANIFEST]["files"]
        # The content's identity: every file's checksum (a re-extraction that changes any value changes it).
        self.fingerprint = hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()
        sizes = self.location.sizes()
        for name, record in self.manifest.items():
            size = sizes.get(name)
            if size != record["size"]:
                found = "is missing" if size is None else f"has {size:,} bytes instead of {record['size']:,}"
                raise PipelineError(
                    f"{self.path} is damaged: {describe(name)} {found}; re-extract with `pipeline extract --force`"
                )

    @property
    def splits(self) -> list[str]:
        return list(self.attrs["splits"])

    @property
    def hooks(self) -> list[str]:
        return list(self.attrs["hooks"])

    @property
    def d_model(self) -> int:
        return int(self.attrs["d_model"])

    @property
    def shard_tokens(self) -> int:
        return int(self.attrs["shard_tokens"])

    @property
    def is_synthetic(self) -> bool:
        return self.attrs.get("synthetic") is not None

    def tokens(self, split: str) -> np.ndarray:
        return self._read(split, "tokens", slice(None))

    def doc_offsets(self, split: str) -> np.ndarray:
        return self._read(split, "doc_offsets", slice(None))

    def activations(self, split: str, hook: str) -> zarr.Array:
        """The [n_tokens, d_model] array of one hook (lazy: index it, or use `read_rows` for named errors)."""
        if hook not in self.hooks:
            raise PipelineError(f"hook {hook!r} is not in store {self.path}; it holds: {', '.join(self.hooks)}")
        return self._split(split)[hook]

    def read_rows(self, split: str, hook: str, start: int, end: int) -> np.ndarray:
        """Activations of tokens start..end-1; a failed read is an error naming split, hook and shard files."""
        self.activations(split, hook)  # names an unknown split or hook
        return self._read(split, hook, slice(start, end))

    def truth(self) -> dict[str, np.ndarray]:
        """A synthetic store's ground truth (see pipeline/synth); an error for a model's store."""
        if TRUTH_GROUP not in self.group:
            raise PipelineError(f"{self.path} holds a model's activations, not synthetic data with known features")
        return {name: array[...] for name, array in self.group[TRUTH_GROUP].arrays()}

    def verify(self, on_bytes: Callable[[int], None] = lambda n: None) -> list[str]:
        """Recompute every file's sha256 against the manifest; returns one line per damaged file."""
        problems, sizes = [], self.location.sizes()
        for name, record in self.manifest.items():
            if name not in sizes:
                problems.append(f"{describe(name)} is missing")
            elif self.location.checksum(name)["sha256"] != record["sha256"]:
                problems.append(f"{describe(name)} does not match its checksum")
            on_bytes(record["size"])
        return problems

    def _read(self, split: str, name: str, rows: slice) -> np.ndarray:
        array = self._split(split)[name]
        try:
            return array[rows]
        except Exception as exc:  # zarr and the filesystem raise many types; all mean "this file is damaged"
            first, stop, _ = rows.indices(array.shape[0])
            size = array.shards[0] if array.shards else array.chunks[0]
            files = sorted({shard_file(array, split, name, i // size) for i in range(first, max(stop, first + 1))})
            raise PipelineError(
                f"{self.path}: reading {split}/{name} failed in {describe(files[0])}"
                f"{f' (or {len(files) - 1} more shard files)' if len(files) > 1 else ''}: "
                f"{type(exc).__name__}: {exc}; `pipeline verify` checks every file"
            ) from exc

    def _split(self, split: str) -> zarr.Group:
        if self.attrs.get("split_stats", {}).get(split, {}).get("streamed"):
            raise PipelineError(f"split {split!r} of {self.path} is not stored: synth.stream generates it while "
                                f"training; evaluate and analyze read {', '.join(self.splits)}")  # fmt: skip
        if split not in self.splits:
            raise PipelineError(f"split {split!r} is not in store {self.path}; it holds: {', '.join(self.splits)}")
        return self.group[split]


def _missing_store_message(location: Location) -> str:
    if location.is_file():
        return f"{location} is a file, not an activation store: set extract.store to a directory"
    staged = location.staging()
    if staged is not location and is_complete(staged):
        hint = " (an interrupted run finished it under .partial: `pipeline extract` moves it into place)"
    elif staged.exists():
        hint = " (an interrupted extraction is there: run `pipeline extract --resume`)"
    else:
        hint = ""
    return f"no activation store at {location}{hint}; run `pipeline extract` first"
