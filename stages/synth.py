"""Stage `synth`: a store of synthetic activations with known features (extract.source = synthetic).

The store has the layout of an extracted one (one hook, `synthetic`; every sample its own token, with no BOS), so
train and evaluate read it unchanged; its `truth` group holds the true features, for evaluate's ground-truth
metrics. Generation is chunked and seeded per shard, so --resume gives the same store as an uninterrupted run.
With `synth.stream`, the train split is not written: the trainer generates the same rows (pipeline/synth/stream.py).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import numpy as np

from pipeline import __version__
from pipeline.core import distributed
from pipeline.core.device import resolve_device
from pipeline.core.progress import progress_bars
from pipeline.params import Params, params_to_dict
from pipeline.store.ranks import finish, open_writer
from pipeline.store.writer import StoreWriter, status, writing
from pipeline.synth import generator
from pipeline.synth.stream import STREAMED_SPLIT

log = logging.getLogger(__name__)

HOOK = "synthetic"


def run(params: Params, resume: bool = False, force: bool = False) -> str:
    """Write the synthetic store at extract.store; a complete one with the same parameters is left alone."""
    cfg = params.synth
    device = resolve_device(cfg.device)
    sizes = {"train": cfg.n_train, "test": cfg.n_test}
    stored = {split: n for split, n in sizes.items() if not (cfg.stream and split == STREAMED_SPLIT)}
    attrs = {
        "model": "synthetic",
        "dataset": "synthetic",
        "hooks": [HOOK],
        "d_model": cfg.d_model,
        "n_ctx": 1,
        "dtype": params.extract.dtype,
        "bos_token_id": None,
        "splits": list(stored),
        "shard_tokens": params.extract.shard_tokens,
        "chunk_tokens": params.extract.chunk_tokens,
        "synthetic": {**params_to_dict(cfg), "device": device.type},
        "process_weights": False,
        "package_version": __version__,
    }
    main = distributed.is_main()
    path = params.extract.store  # a local path or an object-store URL
    with writing(path) if main else nullcontext():  # under torchrun: rank 0 locks and decides
        current, why = distributed.broadcast(status(path, attrs) if main else None)
        if current and not force:
            log.info("%s is up to date (%s): nothing to do; --force recomputes it", path, why)
            return path
        model = generator.build(cfg, device)
        if main:
            log.info(
                "synthetic model: %d features in %d dimensions, %.1f active per sample on average",
                cfg.n_features, cfg.d_model, generator.mean_true_l0(model),
            )  # fmt: skip

        def add_splits(writer: StoreWriter) -> None:
            writer.add_truth(model.arrays())
            for split, n in stored.items():
                writer.add_split(split, np.zeros(n, np.int32), np.array([0, n], dtype=np.int64))

        writer, shards = open_writer(path, attrs, resume, add_splits)
        dtype = np.dtype(params.extract.dtype)
        with progress_bars({"synthesize": sum(end - start for _, _, start, end in shards)}) as bars:
            for split, index, start, end in shards:  # each shard from its own seed: any rank may compute it
                chunks_from = generator.sample_generator(cfg.seed, split, index, device)
                x = generator.samples(model, end - start, chunks_from).cpu().numpy()
                writer.write_shard(split, index, start, {HOOK: x.astype(dtype)})
                bars["synthesize"].advance(end - start)
        finish(writer, {
            "split_stats": {split: {"n_docs": 1, "n_tokens": n, "streamed": split not in stored}
                            for split, n in sizes.items()},
            "true_l0": generator.mean_true_l0(model),
            "command": params.command,
        })  # fmt: skip
    log.info("synthetic store written to %s", path)
    return path
