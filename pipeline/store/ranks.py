"""Several processes writing one store: rank 0 prepares and finalizes, every rank writes its own share of shards.

No file is written by two processes: each rank writes its own shards and its own progress record, and rank 0
merges the records before it writes the manifest. In a single process this is the plain write, with no
communication (pipeline/core/distributed answers as rank 0 of 1).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.core import distributed
from pipeline.store.writer import StoreWriter

log = logging.getLogger(__name__)


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
