"""The activation store's format: the only code that knows its zarr paths, attributes, manifest and records.

Layout (zarr v3 group; readable by any zarr v3 reader; docs/store.md describes every attribute):

    <store>/zarr.json                      group attributes, the manifest among them
    <store>/<split>/tokens                 int32   [n_tokens]
    <store>/<split>/doc_offsets            int64   [n_docs + 1]; document i = tokens[o[i]:o[i+1]]
    <store>/<split>/<hook>                 float16 [n_tokens, d_model], one array per hook
    <store>/truth/...                      synthetic stores only: the true features (pipeline/synth)

Activation arrays are sharded along tokens (`shard_tokens` per shard file, the unit of writing and resuming)
with `chunk_tokens`-row chunks inside (the unit of reading), uncompressed. A shard file is then the shard's rows
as they lie in memory, followed by zarr's shard index: `encode_full_shard` writes a full shard that way, without
zarr's slower general path (tests pin its bytes to zarr's own). While a store is written, `progress.json` records
its finished shards and their checksums (rank r > 0 of a torchrun keeps its own `progress-<r>.json`, so that no
file is written by two processes). The group attribute `manifest` (the checksum algorithm, and the size and
checksum of every file but the group's own zarr.json) is written last, in one write of zarr.json: a store is
complete exactly when it has one. Format 3 records BLAKE3 checksums; format 2 recorded sha256, and is still read.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import zarr

from pipeline.core.location import Location, open_location

FORMAT_VERSION = 3  # 2: the manifest attribute (per-file checksums), token_sha256 in the identity; 3: BLAKE3
READABLE_FORMATS = (2, 3)  # the same content: only the manifest's checksum algorithm differs
PROGRESS_FILE = "progress.json"  # rank 0's record; rank r > 0 writes progress-<r>.json
MANIFEST = "manifest"  # the group attribute that lists every file; its presence marks a complete store
COMPLETION_MARK = "zarr.json"  # the file that holds it: written last, and copied last when a store is committed
ZARR_TEMPORARY = ".partial"  # suffix of zarr's own temporary files (a killed write leaves them behind)
TRUTH_GROUP = "truth"  # synthetic stores: the true features and their distribution (pipeline/synth)
# Attributes that decide a store's content: --resume refuses, and an up-to-date check re-extracts, when any differs.
IDENTITY_KEYS = (
    "format_version", "model", "model_revision", "process_weights", "compute_dtype", "attn_implementation",
    "hooks", "dtype", "tokenizer", "bos_token_id", "template", "dataset", "dataset_config", "splits", "max_docs",
    "max_tokens", "held_out", "shard_tokens", "chunk_tokens", "d_model", "n_ctx", "token_sha256", "synthetic",
)  # fmt: skip


def progress_file(rank: int) -> str:
    return PROGRESS_FILE if rank == 0 else f"progress-{rank}.json"


def progress_files(location: Location) -> list[str]:
    """Every progress record at `location`, of any rank."""
    return location.top_level("progress*.json")


def drop_progress(location: Location) -> None:
    for record in progress_files(location):
        location.remove(record)


def as_location(where: str | Path | Location) -> Location:
    return where if isinstance(where, Location) else open_location(where)


def attributes(location: Location) -> dict:
    """The group attributes in `location`'s zarr.json; {} where there is none, or it cannot be read."""
    try:
        found = json.loads(location.read_text("zarr.json")).get("attributes")
    except (OSError, ValueError, AttributeError):
        return {}
    return found if isinstance(found, dict) else {}


def is_store(where: str | Path | Location) -> bool:
    """Whether `where` holds a store this pipeline wrote (its zarr.json carries our `format_version`)."""
    return "format_version" in attributes(as_location(where))


def is_complete(location: Location) -> bool:
    return MANIFEST in attributes(location)


def token_digest(tokens: np.ndarray, doc_offsets: np.ndarray) -> str:
    """sha256 of a split's token ids and document offsets: changes whenever the data or its tokenization does."""
    digest = hashlib.sha256(np.ascontiguousarray(tokens, dtype=np.int32).tobytes())
    digest.update(np.ascontiguousarray(doc_offsets, dtype=np.int64).tobytes())
    return digest.hexdigest()


def shard_file(array: zarr.Array, split: str, name: str, index: int) -> str:
    """The store-relative path of shard (or chunk) `index` of `split/name`."""
    return f"{split}/{name}/{array.metadata.encode_chunk_key((index,) + (0,) * (array.ndim - 1))}"


def has_writer_layout(array: zarr.Array) -> bool:
    """Whether `array` is laid out as the writer makes activation arrays: [tokens, width], sharded along tokens,
    chunks of whole rows, uncompressed, little-endian (on a little-endian machine), the shard index at the end.

    A full shard of such an array is its chunks one after another, which for chunks of whole rows are the shard's
    rows in memory order; then the index (`shard_index`).
    """
    shard_rows, width = array.shards or (0, 0)
    chunk_rows = array.chunks[0]
    sharding = _normalise(array.metadata.codecs[0].to_dict()) if len(array.metadata.codecs) == 1 else {}
    layout = {
        "name": "sharding_indexed",
        "configuration": {
            "chunk_shape": [chunk_rows, width],
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
            "index_location": "end",
        },
    }
    return (
        sharding == layout and array.ndim == 2 and sys.byteorder == "little" and shard_rows % chunk_rows == 0
        and array.shape[1] == width
    )  # fmt: skip


def chunk_bytes(array: zarr.Array) -> int:
    """The bytes of one chunk of whole rows of a `has_writer_layout` array, as stored."""
    return array.chunks[0] * array.shape[1] * array.dtype.itemsize


def chunks_per_shard(array: zarr.Array) -> int:
    return array.shards[0] // array.chunks[0]


def shard_index(array: zarr.Array) -> bytes:
    """The index that ends a full shard of a `has_writer_layout` array: each chunk's (offset, size) as
    little-endian uint64, chunk after chunk, then the index's crc32c."""
    index = np.empty((chunks_per_shard(array), 2), dtype="<u8")
    index[:, 0] = np.arange(chunks_per_shard(array)) * chunk_bytes(array)
    index[:, 1] = chunk_bytes(array)
    checksum = np.uint32(google_crc32c.value(index.tobytes())).astype("<u4")
    return index.tobytes() + checksum.tobytes()


def stored_chunks(array: zarr.Array, index: int, tail: bytes, file_size: int) -> np.ndarray | None:
    """Where each chunk of shard `index` that holds rows of `array` starts in its file, from `tail`, the file's
    last `index_bytes(array)` bytes; None unless the index's crc32c holds and each such chunk is stored whole and
    uncompressed (a chunk's rows are then its bytes in memory order, as for a full shard the writer wrote)."""
    size = chunk_bytes(array)
    entries = np.frombuffer(tail[:-4], dtype="<u8").reshape(-1, 2)
    rows = min(array.shards[0], array.shape[0] - index * array.shards[0])
    held = entries[: -(-rows // array.chunks[0])]
    intact = (
        google_crc32c.value(tail[:-4]) == int.from_bytes(tail[-4:], "little") and (held[:, 1] == size).all()
        and (held[:, 0] + size <= file_size - len(tail)).all()
    )  # fmt: skip
    return held[:, 0].astype(np.int64) if intact else None


def index_bytes(array: zarr.Array) -> int:
    """The size of the index that ends every shard file of a `has_writer_layout` array."""
    return 16 * chunks_per_shard(array) + 4


def is_full_shard(array: zarr.Array, index: int) -> bool:
    """Whether shard `index` of `array` holds a whole shard's rows (every one but, perhaps, the last)."""
    return (index + 1) * array.shards[0] <= array.shape[0]


def encode_full_shard(array: zarr.Array, start: int, values: np.ndarray) -> list[memoryview] | None:
    """The bytes of the shard file holding rows start..start+len(values) of `array`, as zarr writes it, or None
    where this is not a full shard of a `has_writer_layout` array (then zarr writes it)."""
    fits = (
        has_writer_layout(array) and values.dtype == array.dtype and values.shape == array.shards
        and start % array.shards[0] == 0 and is_full_shard(array, start // array.shards[0])
        and values.flags.c_contiguous
    )  # fmt: skip
    if not fits:
        return None
    return [memoryview(values).cast("B"), memoryview(shard_index(array))]


def describe(name: str) -> str:
    """A store file as a user should read it: split, array and shard file where it is a shard."""
    parts = name.split("/")
    if len(parts) >= 3 and parts[2] == "c":
        return f"split {parts[0]}, array {parts[1]}, shard file {name}"
    return f"file {name}"


def differing(found: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """The identity attributes whose values differ between two attribute sets."""
    return [k for k in IDENTITY_KEYS if _normalise(found.get(k)) != _normalise(wanted.get(k))]


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(value))
