"""Reading a finished store: opening it checks that it is complete and that every file has its recorded size."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import zarr

from pipeline.core.errors import PipelineError
from pipeline.core.location import Location
from pipeline.store.format import (
    MANIFEST,
    READABLE_FORMATS,
    TRUTH_GROUP,
    as_location,
    chunk_bytes,
    describe,
    has_writer_layout,
    index_bytes,
    is_complete,
    progress_files,
    shard_file,
    stored_chunks,
)

READ_THREADS = 4  # shard files read at once


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
        if version not in READABLE_FORMATS:
            raise PipelineError(
                f"{self.path}: store format {version} is not one this version reads "
                f"({', '.join(map(str, READABLE_FORMATS))}); re-extract it with `pipeline extract --force`"
            )
        if MANIFEST not in self.attrs:
            finish = "`pipeline extract --resume` finishes it" if progress_files(self.location) else "re-extract it"
            raise PipelineError(f"{self.path} is incomplete: it has no manifest (written last); {finish}")
        self.manifest: dict[str, dict] = self.attrs[MANIFEST]["files"]
        self._chunk_starts: dict[str, np.ndarray | None] = {}  # shard file -> where its chunks lie (`stored_chunks`)
        # (split, name) -> the array, opened once (zarr reads its metadata to open it), and whether its shards are
        # read as file bytes
        self._arrays: dict[tuple[str, str], tuple[zarr.Array, bool]] = {}
        self.checksum_algorithm: str = self.attrs[MANIFEST].get("algorithm", "sha256")
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
        return self._opened(split, hook)[0]

    def read_rows(self, split: str, hook: str, start: int, end: int, out: np.ndarray | None = None) -> np.ndarray:
        """Activations of tokens start..end-1, into `out` where given (C-contiguous, of their shape and dtype: a
        caller that reuses its memory saves the page faults of fresh memory); a failed read is an error naming split,
        hook and shard files."""
        self.activations(split, hook)  # names an unknown split or hook
        return self._read(split, hook, slice(start, end), out)

    def truth(self) -> dict[str, np.ndarray]:
        """A synthetic store's ground truth (see pipeline/synth); an error for a model's store."""
        if TRUTH_GROUP not in self.group:
            raise PipelineError(f"{self.path} holds a model's activations, not synthetic data with known features")
        return {name: array[...] for name, array in self.group[TRUTH_GROUP].arrays()}

    def verify(self, on_bytes: Callable[[int], None] = lambda n: None) -> list[str]:
        """Recompute every file's checksum (the manifest's algorithm) against the manifest; returns one line per
        damaged file."""
        problems, sizes, algorithm = [], self.location.sizes(), self.checksum_algorithm
        for name, record in self.manifest.items():
            if name not in sizes:
                problems.append(f"{describe(name)} is missing")
            elif self.location.checksum(name, algorithm)[algorithm] != record[algorithm]:
                problems.append(f"{describe(name)} does not match its checksum")
            on_bytes(record["size"])
        return problems

    def _read(self, split: str, name: str, rows: slice, out: np.ndarray | None = None) -> np.ndarray:
        array, direct = self._opened(split, name)
        first, stop, _ = rows.indices(array.shape[0])
        shape = (max(stop, first) - first, *array.shape[1:])
        if out is not None and (out.shape != shape or out.dtype != array.dtype or not out.flags.c_contiguous):
            raise ValueError(f"out is {out.dtype}{list(out.shape)}, not C-contiguous {array.dtype}{list(shape)}")
        try:
            if not direct:
                if out is None:
                    return array[rows]
                out[...] = array[rows]
                return out
            out = np.empty(shape, dtype=array.dtype) if out is None else out
            self._read_direct(array, split, name, first, out)
            return out
        except Exception as exc:  # zarr and the filesystem raise many types; all mean "this file is damaged"
            size = array.shards[0] if array.shards else array.chunks[0]
            files = sorted({shard_file(array, split, name, i // size) for i in range(first, max(stop, first + 1))})
            raise PipelineError(
                f"{self.path}: reading {split}/{name} failed in {describe(files[0])}"
                f"{f' (or {len(files) - 1} more shard files)' if len(files) > 1 else ''}: "
                f"{type(exc).__name__}: {exc}; `pipeline verify` checks every file"
            ) from exc

    def _read_direct(self, array: zarr.Array, split: str, name: str, first: int, out: np.ndarray) -> None:
        """Rows first..first+len(out) of `array` into `out`, each shard's part read from its file as bytes straight
        into it (several shards at once), where the shard's index allows (`stored_chunks`); through zarr where it
        does not."""
        stop = first + len(out)
        shard_rows = array.shards[0]
        pieces = [
            (index, max(first, index * shard_rows), min(stop, (index + 1) * shard_rows))
            for index in range(first // shard_rows, -(-stop // shard_rows))
        ]

        def read(piece: tuple[int, int, int]) -> None:
            index, start, end = piece
            target = out[start - first : end - first]
            if not self._read_shard_rows(array, shard_file(array, split, name, index), index, start, target):
                target[...] = array[start:end]

        if len(pieces) == 1:
            read(pieces[0])
        else:  # file reads release the GIL: shards load in parallel
            with ThreadPoolExecutor(min(READ_THREADS, len(pieces))) as pool:
                list(pool.map(read, pieces))

    def _read_shard_rows(self, array: zarr.Array, file: str, index: int, start: int, target: np.ndarray) -> bool:
        """Rows start..start+len(target) of the array, all in shard `index` (`file`), into `target` as the bytes
        of their chunks; False where the shard's index does not allow it (checked once a file)."""
        path = self.location.path / file
        if file not in self._chunk_starts:
            with path.open("rb") as handle:
                size = handle.seek(0, 2)
                handle.seek(max(0, size - index_bytes(array)))
                self._chunk_starts[file] = stored_chunks(array, index, handle.read(), size)
        starts = self._chunk_starts[file]
        if starts is None:
            return False
        chunk_rows, row_bytes, size = array.chunks[0], target.shape[1] * target.itemsize, chunk_bytes(array)
        row = start - index * array.shards[0]  # within the shard
        view = memoryview(target.reshape(-1)).cast("B")
        with path.open("rb", buffering=0) as handle:
            while view.nbytes:  # a run of chunks stored one after another is one read
                chunk = row // chunk_rows
                run = chunk + 1
                while run < len(starts) and starts[run] == starts[run - 1] + size:
                    run += 1
                handle.seek(int(starts[chunk]) + (row - chunk * chunk_rows) * row_bytes)
                wanted = min(view.nbytes, (run * chunk_rows - row) * row_bytes)
                _read_exactly(handle, view[:wanted], file)
                view, row = view[wanted:], row + wanted // row_bytes
        return True

    def _opened(self, split: str, name: str) -> tuple[zarr.Array, bool]:
        if (split, name) not in self._arrays:
            array = self._split(split)[name]
            direct = not self.location.is_remote and array.shards is not None and has_writer_layout(array)
            self._arrays[split, name] = array, direct
        return self._arrays[split, name]

    def _split(self, split: str) -> zarr.Group:
        if self.attrs.get("split_stats", {}).get(split, {}).get("streamed"):
            raise PipelineError(f"split {split!r} of {self.path} is not stored: synth.stream generates it while "
                                f"training; evaluate and analyze read {', '.join(self.splits)}")  # fmt: skip
        if split not in self.splits:
            raise PipelineError(f"split {split!r} is not in store {self.path}; it holds: {', '.join(self.splits)}")
        return self.group[split]


def _read_exactly(handle: BinaryIO, view: memoryview, file: str) -> None:
    while view.nbytes:
        n = handle.readinto(view)
        if not n:
            raise OSError(f"{file} ended before the rows its index places there")
        view = view[n:]


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
