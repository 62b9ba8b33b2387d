"""Stage `extract`: the corpus's documents (GSM8K by default) through the model, hooked activations into the store."""

from __future__ import annotations

import logging
from contextlib import nullcontext

import numpy as np
import torch

from pipeline import __version__
from pipeline.core import distributed
from pipeline.core.device import extraction_batch_tokens
from pipeline.core.location import open_location
from pipeline.core.progress import progress_bars
from pipeline.corpus import TokenizedSplit, load_documents, start_token, tokenize
from pipeline.extract.shards import ShardExtractor, extract_pending
from pipeline.model import check_hooks, hub_revision, load_model
from pipeline.params import Params
from pipeline.store.format import token_digest
from pipeline.store.ranks import finish, open_writer
from pipeline.store.writer import StoreWriter, status, writing

log = logging.getLogger(__name__)


def run(params: Params, resume: bool = False, force: bool = False) -> str:
    """Tokenize every split, then compute and write each pending shard; returns the store's path.

    A complete store with the same parameters and data is left alone unless `force`. With extract.source =
    synthetic, the store holds the `synth` section's synthetic data instead (stages/synth.py).
    """
    if params.extract.source == "synthetic":
        from stages import synth

        return synth.run(params, resume=resume, force=force)
    main = distributed.is_main()
    path = params.extract.store  # a local path or an object-store URL
    # Rank 0 holds the lock and decides; the other ranks (under torchrun) follow its broadcasts.
    with writing(path) if main else nullcontext():
        model = load_model(params.model)
        stop_at_layer = check_hooks(model, params.extract.hooks)
        tokenizer = model.tokenizer
        start, start_policy = start_token(tokenizer, params.data.bos)
        splits = {
            split: tokenize(
                load_documents(params.data, split),
                tokenizer,
                start,
                model.cfg.n_ctx,
                params.data.max_tokens,
            )
            for split in params.data.splits
        }
        for split, data in splits.items():
            if data.n_truncated and main:
                log.warning(
                    "%s: %d documents longer than %d tokens were truncated", split, data.n_truncated, model.cfg.n_ctx
                )
        attrs = _store_attrs(params, model, splits, start, start_policy)
        current, why = distributed.broadcast(status(path, attrs) if main else None)
        if current and not force:
            log.info("%s is up to date (%s): nothing to do; --force recomputes it", path, why)
            return path
        if main and open_location(path).exists():
            log.info("%s will be replaced: %s", path, "--force" if current else why)

        def add_splits(writer: StoreWriter) -> None:
            for split, data in splits.items():
                writer.add_split(split, data.tokens, data.doc_offsets)

        writer, shards = open_writer(path, attrs, resume, add_splits)
        device = next(model.parameters()).device
        extractor = ShardExtractor(
            model,
            params.extract.hooks,
            stop_at_layer,
            extraction_batch_tokens(params.extract.batch_tokens, device),
            getattr(torch, params.extract.dtype),
        )
        with progress_bars({"extract": sum(end - start for _, _, start, end in shards)}) as bars:
            extract_pending(writer, extractor, splits, shards, on_shard=bars["extract"].advance)
        finish(writer, {
            "split_stats": {split: _stats(data) for split, data in splits.items()},
            "command": params.command,
        })  # fmt: skip
    log.info("activation store written to %s", path)
    return path


def _store_attrs(params: Params, model, splits: dict[str, TokenizedSplit], start: int, start_policy: str) -> dict:
    tokenizer = model.tokenizer
    return {
        "model": params.model.name,
        "model_revision": hub_revision(model, params.model),
        "process_weights": params.model.process_weights,
        "compute_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "attn_implementation": params.model.attn_implementation,
        "hooks": list(params.extract.hooks),
        "d_model": int(model.cfg.d_model),
        "n_ctx": int(model.cfg.n_ctx),
        "dtype": params.extract.dtype,
        "tokenizer": getattr(tokenizer, "name_or_path", None) or params.model.name,
        "bos_token_id": start,
        "bos_policy": start_policy,
        "template": params.data.template,
        "dataset": params.data.dataset,
        "dataset_config": params.data.config,
        "splits": list(params.data.splits),
        "max_docs": params.data.max_docs,
        "max_tokens": params.data.max_tokens,
        "held_out": None
        if params.data.test_fraction is None
        else {
            "from": params.data.splits[0],
            "fraction": params.data.test_fraction,
            "seed": params.data.split_seed,
        },
        "shard_tokens": params.extract.shard_tokens,
        "chunk_tokens": params.extract.chunk_tokens,
        "token_sha256": {split: token_digest(data.tokens, data.doc_offsets) for split, data in splits.items()},
        "package_version": __version__,
    }


def _stats(data: TokenizedSplit) -> dict:
    return {
        "n_docs": data.n_docs,
        "n_tokens": int(data.doc_offsets[-1]),
        "n_truncated_docs": int(data.n_truncated),
        "max_doc_tokens": int(np.diff(data.doc_offsets).max(initial=0)),
    }
