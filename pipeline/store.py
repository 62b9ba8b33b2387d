"""The activation store format: the only module that knows zarr paths, attributes and the manifest.

Layout (zarr v3 group; readable by any zarr v3 reader):

    <store>/zarr.json                      group attributes (documented in the README)
    <store>/<split>/tokens                 int32   [n_tokens]
    <store>/<split>/doc_offsets            int64   [n_docs + 1]; document i = tokens[o[i]:o[i+1]]
    <store>/<split>/<hook>                 float16 [n_tokens, d_model], one array per hook

Activation arrays are sharded along tokens (`shard_tokens` per shard file, the unit of writing and resuming)
with `chunk_tokens`-row chunks inside (the unit of reading). A store is built under `<store>.partial`, where
`progress.json` records finished shards (and their checksums) for --resume; under torchrun, rank r > 0 keeps its
own record in `progress-<r>.json`, so that no file is written by two processes, and any later run (of any
world size) merges them. The group attribute `manifest`
(size and sha256 of every file but the group's own zarr.json) is written last, in one atomic write of zarr.json:
a store is complete exactly when it has one, and only then is it renamed to its final name. A run that finds a
complete `.partial` (a crash between the manifest and the rename) finishes the rename instead of recomputing.

A store may also live on object storage (`s3://bucket/prefix`, `gs://…`; pipeline/location.py). There is no
rename there, so it is built in place: readers refuse it until the manifest is in zarr.json (replaced in one PUT),
and --resume reads the same progress records, kept as objects beside it. Nothing can lock an object store: run
one extraction per prefix at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline import distributed
from pipeline.atomic import check_replaceable, remove_litter, replace_dir
from pipeline.errors import PipelineError
from pipeline.location import Location
from pipeline.locks import exclusive_lock

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: the manifest attribute (per-file checksums), token_sha256 in the identity
PROGRESS_FILE = "progress.json"  # rank 0's record; rank r > 0 writes progress-<r>.json
MANIFEST = "manifest"  # the group attribute that lists every file; its presence marks a complete store
ZARR_TEMPORARY = ".partial"  # suffix of zarr's own temporary files (a killed write leaves them behind)
# Attributes that decide a store's content: --resume refuses, and an up-to-date check re-extracts, when any differs.
IDENTITY_KEYS = (
    "format_version", "model", "model_revision", "process_weights", "compute_dtype", "hooks", "dtype",
    "tokenizer", "bos_token_id", "template", "dataset", "dataset_config", "splits", "max_docs",
    "shard_tokens", "chunk_tokens", "d_model", "n_ctx", "token_sha256", "synthetic",
)  # fmt: skip
TRUTH_GROUP = "truth"  # synthetic stores: the true features and their distribution (pipeline/synthetic.py)


def progress_file(rank: int) -> str:
    return PROGRESS_FILE if rank == 0 else f"progress-{rank}.json"


def _progress_files(location: Location) -> list[str]:
    return location.top_level("progress*.json")


def _drop_progress(location: Location) -> None:
    for record in _progress_files(location):
        location.remove(record)


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def is_store(path: str | Path | Location) -> bool:
    """Whether `path` holds a store this pipeline wrote (its zarr.json carries our `format_version`)."""
    return "format_version" in _attributes(_location(path))


def exists(path: str | Path) -> bool:
    """Whether anything at all is at `path` (a directory, a file, or objects under a prefix)."""
    return Location(path).exists()


def _location(path: str | Path | Location) -> Location:
    return path if isinstance(path, Location) else Location(path)


def _is_complete(location: Location) -> bool:
    return MANIFEST in _attributes(location)


def _attributes(location: Location) -> dict:
    try:
        attributes = json.loads(location.read_text("zarr.json")).get("attributes")
    except (OSError, ValueError, AttributeError):
        return {}
    return attributes if isinstance(attributes, dict) else {}


def _check_replaceable(location: Location) -> None:
    """Refuse (before any work) to write over a directory or prefix that holds anything but a store of ours."""
    if not location.is_remote:
        check_replaceable(location.path, is_store)
    elif location.exists() and not is_store(location):
        raise PipelineError(
            f"{location} holds objects that this pipeline did not write; refusing to replace them "
            "(choose another prefix, or remove them)"
        )


def token_digest(tokens: np.ndarray, doc_offsets: np.ndarray) -> str:
    """sha256 of a split's token ids and document offsets: changes whenever the data or its tokenization does."""
    digest = hashlib.sha256(np.ascontiguousarray(tokens, dtype=np.int32).tobytes())
    digest.update(np.ascontiguousarray(doc_offsets, dtype=np.int64).tobytes())
    return digest.hexdigest()


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Exclusive right to write the store at `path`, after finishing whatever an interrupted run left halfway.

    Refuses (before any work) when `path` or its `.partial` is a directory this pipeline did not write. On object
    storage the refusal is the same, but there is no lock: one run per prefix at a time is the user's to keep.
    """
    location = Location(path)
    if location.is_remote:
        _check_replaceable(location)
        if _is_complete(location):
            _drop_progress(location)  # left by a run stopped between its manifest and this cleanup
        yield
        return
    path = location.path
    if path.exists() and not path.is_dir():
        raise PipelineError(f"output path {path} exists and is a file, not a store directory")
    for candidate in (path, partial_path(path)):
        check_replaceable(candidate, is_store)
    with exclusive_lock(path):
        _finish_interrupted_swap(path)
        yield


def status(path: str | Path, attrs: dict[str, Any]) -> tuple[bool, str]:
    """(True, _) when a complete, undamaged store with these identity attributes is at `path`; else why not."""
    location = Location(path)
    if not location.exists():
        return False, "no store there yet"
    try:
        store = ActivationStore(location)
    except PipelineError as exc:
        return False, str(exc)
    differing = _differing(store.attrs, {"format_version": FORMAT_VERSION, **attrs})
    if differing:
        return False, f"it was written with other parameters or data ({', '.join(differing)})"
    return True, "same parameters and data, every file present"


class StoreWriter:
    """Builds a store one whole shard at a time: locally under `<path>.partial`, then renamed into place; on
    object storage in place, complete once finalize writes its manifest."""

    def __init__(self, path: str | Path, attrs: dict[str, Any], resume: bool, rank: int = 0) -> None:
        """Rank 0 (or the only process) starts or resumes the store; rank r > 0 joins the one rank 0 prepared."""
        self.final = Location(path)
        self.work = self.final if self.final.is_remote else Location(partial_path(self.final.path))
        self.attrs = {"format_version": FORMAT_VERSION, **attrs}
        self.progress = progress_file(rank)
        self.done: dict[str, set[int]] = {}
        self.files: dict[str, dict] = {}
        if rank > 0:
            self.group = zarr.open_group(self.work.zarr_store, mode="r+", zarr_format=3)
            return
        # A partial store killed before its first progress record holds nothing worth keeping: start over.
        if resume and self.work.exists(PROGRESS_FILE) and self.work.exists("zarr.json"):
            self.group = zarr.open_group(self.work.zarr_store, mode="r+", zarr_format=3)
            differing = _differing(dict(self.group.attrs), self.attrs)
            if differing:
                details = "; ".join(
                    f"{k}: store has {self.group.attrs.get(k)!r}, params say {self.attrs.get(k)!r}" for k in differing
                )
                raise PipelineError(f"cannot --resume {self.work}: it was written with different parameters "
                                    f"({details}); run without --resume to start over")  # fmt: skip
            self._merge_progress()
        else:
            if resume:
                log.warning("nothing to resume at %s: extracting from the start", self.work)
            _check_replaceable(self.work)
            self.work.remove_all()
            if not self.work.is_remote:
                self.work.path.parent.mkdir(parents=True, exist_ok=True)
            self.group = zarr.open_group(self.work.zarr_store, mode="w", zarr_format=3, attributes=self.attrs)
            self._save_progress()

    def add_split(self, split: str, tokens: np.ndarray, doc_offsets: np.ndarray) -> None:
        """Create the split's arrays (tokens and offsets written now; activations shard by shard)."""
        if split in self.group:
            return  # resumed: already created, with identical parameters
        shard, chunk, d_model = self.attrs["shard_tokens"], self.attrs["chunk_tokens"], self.attrs["d_model"]
        group = self.group.create_group(split)
        group.create_array("tokens", data=tokens.astype(np.int32), chunks=(shard,))
        group.create_array("doc_offsets", data=doc_offsets.astype(np.int64), chunks=(max(len(doc_offsets), 1),))
        for hook in self.attrs["hooks"]:
            group.create_array(
                hook,
                shape=(len(tokens), d_model),
                dtype=self.attrs["dtype"],
                chunks=(chunk, d_model),
                shards=(shard, d_model),
                compressors=None,  # fp16 activations barely compress; measured in the README
            )
        self.done.setdefault(split, set())
        self._save_progress()

    def add_truth(self, arrays: dict[str, np.ndarray]) -> None:
        """Keep a synthetic store's ground truth inside it (so it is checksummed, and moves with it)."""
        if TRUTH_GROUP in self.group:
            return  # resumed: written before, from identical parameters
        group = self.group.create_group(TRUTH_GROUP)
        for name, values in arrays.items():
            group.create_array(name, data=values, chunks=values.shape or None)

    def pending_shards(self, split: str) -> list[tuple[int, int, int]]:
        """(index, first token, end token) of every shard of `split` not yet written."""
        n_tokens = self.group[split]["tokens"].shape[0]
        size = self.attrs["shard_tokens"]
        return [
            (i, start, min(start + size, n_tokens))
            for i, start in enumerate(range(0, n_tokens, size))
            if i not in self.done.get(split, ())
        ]

    def all_pending_shards(self) -> list[tuple[str, int, int, int]]:
        """(split, index, first token, end token) of every shard not yet written, split by split."""
        return [(split, *shard) for split in self.attrs["splits"] for shard in self.pending_shards(split)]

    def write_shard(self, split: str, index: int, start: int, activations: dict[str, np.ndarray]) -> None:
        """Write one whole shard of every hook and its checksum (read back while still in the page cache)."""
        for hook, values in activations.items():
            array = self.group[split][hook]
            array[start : start + len(values)] = values
            name = _shard_file(array, split, hook, index)
            self.files[name] = self.work.checksum(name)
        self.done.setdefault(split, set()).add(index)
        self._save_progress()

    def finalize(self, extra_attrs: dict[str, Any]) -> None:
        """Record the summary attributes with the manifest (the completion mark), then move the store into place.

        Rank 0 only, once every rank has written its shards: their progress records are merged first, and a
        shard that no record lists is an error (the store is left incomplete for --resume).
        """
        self._merge_progress()
        missing = {split: len(self.pending_shards(split)) for split in self.attrs["splits"]}
        if any(missing.values()):
            raise PipelineError(
                f"{self.work}: shards were never written ({', '.join(f'{s}: {n}' for s, n in missing.items())}); "
                "run `pipeline extract --resume` to compute them"
            )
        files = {}
        records = _progress_files(self.work)
        for name, size in sorted(self.work.sizes().items()):
            if name == "zarr.json" or name in records:
                continue
            if name.endswith(ZARR_TEMPORARY):  # left by a write that was killed before a resume
                self.work.remove(name)
                continue
            known = self.files.get(name)
            files[name] = known if known and known["size"] == size else self.work.checksum(name)
        self.group.attrs.update({**extra_attrs, MANIFEST: {"algorithm": "sha256", "files": files}})
        _drop_progress(self.work)
        if not self.work.is_remote:
            replace_dir(self.work.path, self.final.path, is_store)

    def _merge_progress(self) -> None:
        """Fold every rank's record (of this run or of an earlier one, of any world size) into progress.json."""
        for record in _progress_files(self.work):
            progress = json.loads(self.work.read_text(record))
            for split, indices in progress["shards"].items():
                self.done.setdefault(split, set()).update(indices)
            self.files.update(progress["files"])
        self._save_progress()  # before removing the others: a record is never lost, only duplicated
        for record in _progress_files(self.work):
            if record != PROGRESS_FILE:
                self.work.remove(record)

    def _save_progress(self) -> None:
        shards = {split: sorted(indices) for split, indices in self.done.items()}
        self.work.write_json(self.progress, {"shards": shards, "files": self.files})


def open_writer(
    path: str | Path, attrs: dict[str, Any], resume: bool, prepare: Callable[[StoreWriter], None]
) -> tuple[StoreWriter, list[tuple[str, int, int, int]]]:
    """This rank's writer, and its share of the pending shards: (split, index, first token, end token).

    Rank 0 (or the only process) creates or resumes the store, has `prepare` create its arrays, and lists what is
    pending; every rank then takes every world_size-th shard of that list, so the shares are disjoint and together
    cover it, whatever the world size of an interrupted run was.
    """
    rank, world_size = distributed.rank(), distributed.world_size()
    pending = None
    if rank == 0:
        writer = StoreWriter(path, attrs, resume)
        prepare(writer)
        pending = writer.all_pending_shards()
    pending = distributed.broadcast(pending)  # also waits until rank 0 has created the arrays
    if rank > 0:
        writer = StoreWriter(path, attrs, resume, rank=rank)
    mine = pending[rank::world_size]
    log.debug("rank %d of %d: %d of the %d pending shards", rank, world_size, len(mine), len(pending))
    if rank == 0 and 0 < len(pending) < world_size:
        log.warning(
            "%d shard(s) to write for %d processes: %d of them have nothing to do (a shard is the unit of "
            "work; a smaller extract.shard_tokens makes more)", len(pending), world_size, world_size - len(pending)
        )  # fmt: skip
    return writer, mine


def finish(writer: StoreWriter, extra_attrs: dict[str, Any]) -> None:
    """Once every rank has written its shards, rank 0 finalizes the store; no rank returns before it is in place."""
    distributed.barrier()
    if distributed.is_main():
        writer.finalize(extra_attrs)
    distributed.barrier()


class BackgroundWriter:
    """Writes shards on a thread so that the model never waits on the disk; errors surface on the next call."""

    def __init__(self, writer: StoreWriter, max_pending: int = 2) -> None:
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="store-writer")
        self.thread.start()

    def submit(self, split: str, index: int, start: int, activations: dict[str, np.ndarray]) -> None:
        self._raise_if_failed()
        self.queue.put((split, index, start, activations))

    def close(self) -> None:
        """Wait until every submitted shard is on disk."""
        self.queue.put(None)
        self.thread.join()
        self._raise_if_failed()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.writer.write_shard(*item)
                except BaseException as exc:  # kept and re-raised in the producer's thread
                    self.error = exc

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise PipelineError(f"writing the store failed: {self.error}") from self.error


class ActivationStore:
    """Read access to a finished store; opening it checks that every file is present with its recorded size."""

    def __init__(self, path: str | Path | Location) -> None:
        self.location = _location(path)
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
            finish = "`pipeline extract --resume` finishes it" if _progress_files(self.location) else "re-extract it"
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
                    f"{self.path} is damaged: {_describe(name)} {found}; re-extract with `pipeline extract --force`"
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
        """A synthetic store's ground truth (see pipeline/synthetic.py); an error for a model's store."""
        if TRUTH_GROUP not in self.group:
            raise PipelineError(f"{self.path} holds a model's activations, not synthetic data with known features")
        return {name: array[...] for name, array in self.group[TRUTH_GROUP].arrays()}

    @property
    def is_synthetic(self) -> bool:
        return self.attrs.get("synthetic") is not None

    @property
    def shard_tokens(self) -> int:
        return int(self.attrs["shard_tokens"])

    def verify(self, on_bytes: Callable[[int], None] = lambda n: None) -> list[str]:
        """Recompute every file's sha256 against the manifest; returns one line per damaged file."""
        problems, sizes = [], self.location.sizes()
        for name, record in self.manifest.items():
            if name not in sizes:
                problems.append(f"{_describe(name)} is missing")
            elif self.location.checksum(name)["sha256"] != record["sha256"]:
                problems.append(f"{_describe(name)} does not match its checksum")
            on_bytes(record["size"])
        return problems

    def _read(self, split: str, name: str, rows: slice) -> np.ndarray:
        array = self._split(split)[name]
        try:
            return array[rows]
        except Exception as exc:  # zarr and the filesystem raise many types; all mean "this file is damaged"
            first, stop, _ = rows.indices(array.shape[0])
            size = array.shards[0] if array.shards else array.chunks[0]
            files = sorted({_shard_file(array, split, name, i // size) for i in range(first, max(stop, first + 1))})
            raise PipelineError(
                f"{self.path}: reading {split}/{name} failed in {_describe(files[0])}"
                f"{f' (or {len(files) - 1} more shard files)' if len(files) > 1 else ''}: "
                f"{type(exc).__name__}: {exc}; `pipeline verify` checks every file"
            ) from exc

    def _split(self, split: str) -> zarr.Group:
        if split not in self.splits:
            raise PipelineError(f"split {split!r} is not in store {self.path}; it holds: {', '.join(self.splits)}")
        return self.group[split]


def _finish_interrupted_swap(path: Path) -> None:
    """Move a complete `.partial` (it has its manifest) into place, and remove temporaries of killed runs."""
    partial = Location(partial_path(path))
    if _is_complete(partial):
        _drop_progress(partial)
        replace_dir(partial.path, path, is_store)
        log.info("%s: moved into place the store an interrupted run had finished", path)
    for litter in remove_litter(path):
        log.info("removed %s, left by a killed run", litter)


def _missing_store_message(location: Location) -> str:
    if location.is_remote:
        hint = " (an interrupted extraction is there: run `pipeline extract --resume`)" if location.exists() else ""
        return f"no activation store at {location}{hint}; run `pipeline extract` first"
    path = location.path
    partial = partial_path(path)
    if _is_complete(Location(partial)):
        hint = " (an interrupted run finished it under .partial: `pipeline extract` moves it into place)"
    elif partial.exists():
        hint = " (an interrupted extraction is there: run `pipeline extract --resume`)"
    else:
        hint = ""
    return f"no activation store at {path}{hint}; run `pipeline extract` first"


def _shard_file(array: zarr.Array, split: str, name: str, index: int) -> str:
    """The store-relative path of shard (or chunk) `index` of `split/name`."""
    return f"{split}/{name}/{array.metadata.encode_chunk_key((index,) + (0,) * (array.ndim - 1))}"


def _describe(name: str) -> str:
    parts = name.split("/")
    if len(parts) >= 3 and parts[2] == "c":
        return f"split {parts[0]}, array {parts[1]}, shard file {name}"
    return f"file {name}"


def _differing(found: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    return [k for k in IDENTITY_KEYS if _normalise(found.get(k)) != _normalise(wanted.get(k))]


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(value))
