"""The store's own write path: full shards written as zarr writes them, hashed as written, several at once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.core.location import open_location
from pipeline.store import ActivationStore
from pipeline.store.background import BackgroundWriter
from pipeline.store.format import encode_full_shard
from pipeline.store.writer import StoreWriter

SHARD, CHUNK, WIDTH = 2048, 256, 24


def zarr_array(root: Path, dtype: str, rows: int, compressed: bool = False) -> zarr.Array:
    group = zarr.open_group(root, mode="w", zarr_format=3)
    extra = {} if compressed else {"compressors": None}
    return group.create_array("a", shape=(rows, WIDTH), dtype=dtype, chunks=(CHUNK, WIDTH), shards=(SHARD, WIDTH),
                              **extra)  # fmt: skip


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("index", [0, 1])
def test_a_full_shard_is_the_bytes_zarr_writes(tmp_path, dtype, index):
    array = zarr_array(tmp_path, dtype, rows=3 * SHARD - 100)  # the last shard is partial
    values = np.random.default_rng(index).standard_normal((SHARD, WIDTH)).astype(dtype)
    array[index * SHARD : (index + 1) * SHARD] = values
    ours = b"".join(encode_full_shard(array, index * SHARD, values))
    assert ours == (tmp_path / "a" / "c" / str(index) / "0").read_bytes()
    assert np.array_equal(array[index * SHARD : (index + 1) * SHARD], values)


def test_anything_but_a_full_uncompressed_shard_is_left_to_zarr(tmp_path):
    array = zarr_array(tmp_path / "plain", "float16", rows=3 * SHARD - 100)
    values = np.zeros((SHARD, WIDTH), dtype="float16")
    assert encode_full_shard(array, 2 * SHARD, values[: SHARD - 100]) is None  # the partial last shard
    assert encode_full_shard(array, 0, values.astype("float32")) is None  # another dtype
    assert encode_full_shard(array, 0, np.asfortranarray(values)) is None  # not in row order
    assert encode_full_shard(zarr_array(tmp_path / "compressed", "float16", 2 * SHARD, True), 0, values) is None


def write_store(path: Path, data: dict[str, np.ndarray], workers: int) -> ActivationStore:
    rows, dtype = len(next(iter(data.values()))), str(next(iter(data.values())).dtype)
    attrs = {"hooks": list(data), "d_model": WIDTH, "dtype": dtype, "splits": ["s"], "shard_tokens": SHARD,
             "chunk_tokens": CHUNK, "model": "m", "dataset": "d", "n_ctx": 64, "bos_token_id": 0}  # fmt: skip
    writer = StoreWriter(path, attrs, resume=False)
    writer.add_split("s", np.zeros(rows, np.int32), np.array([0, rows]))
    background = BackgroundWriter(writer, workers)
    for index, start, end in writer.pending_shards("s"):
        background.submit("s", index, start, {hook: values[start:end] for hook, values in data.items()})
    background.close()
    writer.finalize({})
    return ActivationStore(path)


def test_shards_written_at_once_make_the_one_writers_store(tmp_path):
    rows = 5 * SHARD - 300  # four full shards, written as bytes, and a partial one, written by zarr
    rng = np.random.default_rng(0)
    data = {hook: rng.standard_normal((rows, WIDTH)).astype(np.float16) for hook in ("h1", "h2")}
    one, several = write_store(tmp_path / "one", data, 1), write_store(tmp_path / "several", data, 3)
    assert several.manifest == one.manifest  # byte for byte
    for hook, values in data.items():
        assert np.array_equal(several.read_rows("s", hook, 0, rows), values)
    location = open_location(several.path)
    for name, record in several.manifest.items():  # hashed as written: what a read-back finds
        assert location.checksum(name) == record, name


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_reads_are_zarr_s_own_reads_byte_for_byte(tmp_path, dtype):
    rows = 3 * SHARD - 300  # two full shards and a partial one (its last chunk padded), all read as bytes
    data = {"h": np.random.default_rng(1).standard_normal((rows, WIDTH)).astype(dtype)}
    store = write_store(tmp_path / "store", data, 2)
    array = store.activations("s", "h")
    ranges = [(0, rows), (0, SHARD), (SHARD - 5, 2 * SHARD + 7), (CHUNK, 2 * CHUNK), (2 * SHARD + 1, rows), (5, 6),
              (rows, rows)]  # fmt: skip
    for start, end in ranges:
        ours, theirs = store.read_rows("s", "h", start, end), array[start:end]
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, (start, end)
        assert ours.tobytes() == theirs.tobytes(), (start, end)
    assert all(starts is not None for starts in store._chunk_starts.values())  # every shard read as bytes
    assert len(store._chunk_starts) == 3
    into = np.full((2 * SHARD + 7 - (SHARD - 5), WIDTH), np.nan, dtype=dtype)  # a caller's memory, reused
    assert store.read_rows("s", "h", SHARD - 5, 2 * SHARD + 7, out=into) is into
    assert into.tobytes() == array[SHARD - 5 : 2 * SHARD + 7].tobytes()
    for wrong in (into[1:], into.astype("float64"), into[:, ::2]):
        with pytest.raises(ValueError, match="not C-contiguous"):
            store.read_rows("s", "h", SHARD - 5, 2 * SHARD + 7, out=wrong)
