"""Writing a store: one whole shard at a time, resumable, complete only when its manifest is written.

A store is built at its location's staging place (pipeline/core/location: `<store>.partial` on a disk, in place
on object storage), records every finished shard and its checksum in a progress record, and is committed once
the manifest (the completion mark) is in zarr.json. A run that finds a complete staged store (a crash between
the manifest and the commit) finishes the commit instead of recomputing.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.core.errors import PipelineError
from pipeline.core.location import CHECKSUM, open_location
from pipeline.store.format import (
    COMPLETION_MARK,
    FORMAT_VERSION,
    MANIFEST,
    PROGRESS_FILE,
    TRUTH_GROUP,
    ZARR_TEMPORARY,
    differing,
    drop_progress,
    encode_full_shard,
    is_complete,
    is_store,
    progress_file,
    progress_files,
    shard_file,
)
from pipeline.store.reader import ActivationStore

log = logging.getLogger(__name__)


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Exclusive right to write the store at `path`, after finishing whatever an interrupted run left halfway.

    Refuses (before any work) when `path` or its staging place holds anything this pipeline did not write.
    """
    final = open_location(path)
    staged = final.staging()
    if not is_complete(staged):  # else a commit was interrupted, and what is at `final` is half ours, half new
        for place in (final, staged):
            place.check_replaceable(is_store)
    with final.lock():
        if is_complete(staged):  # a run stopped between its manifest and its last steps
            drop_progress(staged)
            if final.commit(staged, is_store, COMPLETION_MARK):
                log.info("%s: moved into place the store an interrupted run had finished", path)
        for litter in final.remove_litter():
            log.info("removed %s, left by a killed run", litter)
        yield


def status(path: str | Path, attrs: dict[str, Any]) -> tuple[bool, str]:
    """(True, _) when a complete, undamaged store with these identity attributes is at `path`; else why not."""
    location = open_location(path)
    if not location.exists():
        return False, "no store there yet"
    try:
        store = ActivationStore(location)
    except PipelineError as exc:
        return False, str(exc)
    # Any format this version reads is up to date: the same content, only the manifest's checksums differ.
    different = differing(store.attrs, {"format_version": store.attrs["format_version"], **attrs})
    if different:
        return False, f"it was written with other parameters or data ({', '.join(different)})"
    return True, "same parameters and data, every file present"


class StoreWriter:
    """Builds a store one whole shard at a time at its staging place; `finalize` completes and commits it."""

    def __init__(self, path: str | Path, attrs: dict[str, Any], resume: bool, rank: int = 0) -> None:
        """Rank 0 (or the only process) starts or resumes the store; rank r > 0 joins the one rank 0 prepared."""
        self.final = open_location(path)
        self.work = self.final.staging()
        self.attrs = {"format_version": FORMAT_VERSION, **attrs}
        self.progress = progress_file(rank)
        self.created: set[str] = set()  # groups (splits, truth) whose arrays were all created
        self.done: dict[str, set[int]] = {}  # finished shards of each split
        self.files: dict[str, dict] = {}
        self.recording = threading.Lock()  # writer threads update the records above one at a time
        if rank > 0:
            self.group = zarr.open_group(self.work.zarr_store, mode="r+", zarr_format=3)
            return
        # A partial store killed before its first progress record holds nothing worth keeping: start over.
        if resume and self.work.exists(PROGRESS_FILE) and self.work.exists("zarr.json"):
            self.group = zarr.open_group(self.work.zarr_store, mode="r+", zarr_format=3)
            different = differing(dict(self.group.attrs), self.attrs)
            if different:
                details = "; ".join(
                    f"{k}: store has {self.group.attrs.get(k)!r}, params say {self.attrs.get(k)!r}" for k in different
                )
                raise PipelineError(f"cannot --resume {self.work}: it was written with different parameters "
                                    f"({details}); run without --resume to start over")  # fmt: skip
            self._merge_progress()
        else:
            if resume:
                log.warning("nothing to resume at %s: extracting from the start", self.work)
            self.work.check_replaceable(is_store)
            self.work.remove_all()
            self.group = zarr.open_group(self.work.zarr_store, mode="w", zarr_format=3, attributes=self.attrs)
            self._save_progress()

    def add_split(self, split: str, tokens: np.ndarray, doc_offsets: np.ndarray) -> None:
        """Create the split's arrays (tokens and offsets written now; activations shard by shard)."""
        if not self._begin_group(split):
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
                compressors=None,  # fp16 activations barely compress, and decoding would cost more than it saves
            )
        self.done.setdefault(split, set())
        self._end_group(split)

    def add_truth(self, arrays: dict[str, np.ndarray]) -> None:
        """Keep a synthetic store's ground truth inside it (so it is checksummed, and moves with it)."""
        if not self._begin_group(TRUTH_GROUP):
            return  # resumed: written before, from identical parameters
        group = self.group.create_group(TRUTH_GROUP)
        for name, values in arrays.items():
            group.create_array(name, data=values, chunks=values.shape or None)
        self._end_group(TRUTH_GROUP)

    def _begin_group(self, name: str) -> bool:
        """Whether group `name` is still to be created; what a run interrupted while creating it left is removed.

        A group counts as created only once the progress record says so (`_end_group`, after its last array):
        a run killed between its first array and its last leaves some arrays, or an array whose metadata exists
        but whose data was never written, and none of it can be trusted.
        """
        if name in self.created:
            return False
        if name in self.group:
            log.info("%s: removing %s, left half-created by an interrupted run", self.work, name)
            del self.group[name]
            self.done.pop(name, None)
            self.files = {file: record for file, record in self.files.items() if not file.startswith(f"{name}/")}
        return True

    def _end_group(self, name: str) -> None:
        self.created.add(name)
        self._save_progress()

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
        """Write one whole shard of every hook and its checksum; several threads may write different shards.

        A full shard is written as its bytes (rows, then index) and hashed as they are written; an array's last,
        partial shard is written by zarr and read back for its checksum.
        """
        records = {}
        for hook, values in activations.items():
            array = self.group[split][hook]
            name = shard_file(array, split, hook, index)
            parts = encode_full_shard(array, start, values)
            if parts is None:
                array[start : start + len(values)] = values
                records[name] = self.work.checksum(name)
            else:
                records[name] = self.work.write_parts(name, parts)
        with self.recording:
            self.files.update(records)
            self.done.setdefault(split, set()).add(index)
            self._save_progress()

    def finalize(self, extra_attrs: dict[str, Any]) -> None:
        """Record the summary attributes with the manifest (the completion mark), then commit the store.

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
        records = progress_files(self.work)
        for name, size in sorted(self.work.sizes().items()):
            if name == "zarr.json" or name in records:
                continue
            if name.endswith(ZARR_TEMPORARY):  # left by a write that was killed before a resume
                self.work.remove(name)
                continue
            known = self.files.get(name)
            files[name] = known if known and known["size"] == size else self.work.checksum(name)
        self.group.attrs.update({**extra_attrs, MANIFEST: {"algorithm": CHECKSUM, "files": files}})
        drop_progress(self.work)
        self.final.commit(self.work, is_store, COMPLETION_MARK)

    def _merge_progress(self) -> None:
        """Fold every rank's record (of this run or of an earlier one, of any world size) into progress.json."""
        for record in progress_files(self.work):
            progress = json.loads(self.work.read_text(record))
            for split, indices in progress["shards"].items():
                self.done.setdefault(split, set()).update(indices)
            self.files.update(progress["files"])
            self.created.update(progress.get("created", progress["shards"]))  # older records: a split with shards
        self._save_progress()  # before removing the others: a record is never lost, only duplicated
        for record in progress_files(self.work):
            if record != PROGRESS_FILE:
                self.work.remove(record)

    def _save_progress(self) -> None:
        shards = {split: sorted(indices) for split, indices in self.done.items()}
        self.work.write_json(self.progress, {"created": sorted(self.created), "shards": shards, "files": self.files})
