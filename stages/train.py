"""Stage `train`: SAEs from the activation store, one shared read of the data for every config."""

from __future__ import annotations

import csv
import io
import logging
import time
from pathlib import Path

from pipeline.atomic import save_torch, write_json, write_text
from pipeline.config import Params, params_to_dict, sae_outputs
from pipeline.device import amp_dtype, describe, peak_memory_bytes, reset_peak_memory, resolve_device
from pipeline.loader import ActivationLoader
from pipeline.sae import save_saelens
from pipeline.store import ActivationStore
from pipeline.trainer import CURVE_COLUMNS, SAERun, Trainer

log = logging.getLogger(__name__)


def run(params: Params, which: str = "all", resume: bool = False) -> dict[str, dict]:
    """Train the configs named by `which` ("all" or a key of `sae`); returns their metrics."""
    cfg = params.train
    configs = params.sae_configs(which)
    store = ActivationStore(params.extract.store)
    device = resolve_device(cfg.device)
    started = time.perf_counter()
    reset_peak_memory(device)
    loader = ActivationLoader(
        store, cfg.split, cfg.hook, device, cfg.seed, cfg.exclude_bos, cfg.memory_budget_gb
    )  # fmt: skip
    meta = {
        "hook": cfg.hook,
        "store": str(store.path),
        "model": store.attrs["model"],
        "dataset": store.attrs["dataset"],
        "n_ctx": store.attrs["n_ctx"],
    }
    trainer = Trainer(configs, loader, cfg, Path(cfg.out_dir) / "checkpoints", meta)
    resumed = trainer.resume() if resume else []
    stale = [r.name for r in trainer.runs if not resume and trainer.checkpoint_path(r).is_file()]
    if stale:
        log.warning("starting over: checkpoints of an interrupted run of %s exist (--resume continues it)", stale)
    if resumed:
        log.info("resumed %s", ", ".join(resumed))
    else:
        log.info("input scale factor %.4g (E||scale*x||^2 = d_in)", trainer.estimate_scale())
    log.info(
        "training %s on %d tokens of %s/%s (%s-resident, device %s)",
        ", ".join(r.name for r in trainer.runs),
        loader.n_tokens,
        cfg.split,
        cfg.hook,
        "device" if loader.resident_on_device else "host",
        device,
    )
    trainer.fit()
    wall = time.perf_counter() - started
    peak, peak_kind = peak_memory_bytes(device)
    shared = {
        "trained_with": [r.key for r in trainer.runs],
        "run_wall_time_s": wall,
        "loader_stall_s": loader.stall_seconds,
        "loader_residency": "device" if loader.resident_on_device else "host",
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "peak_memory_scope": "the whole train run (all configs in it)",
        "device": str(device),
        "hardware": describe(device),
        "amp": str(amp_dtype(cfg.amp, device) or "none (float32)").removeprefix("torch."),
        "scale_factor": trainer.scale,
        "n_training_tokens_per_epoch": loader.n_tokens,
    }
    metrics = {}
    for sae_run in trainer.runs:
        metrics[sae_run.key] = _write_outputs(params, trainer, sae_run, shared)
    for sae_run in trainer.runs:  # the final outputs now hold everything the periodic checkpoints held
        trainer.checkpoint_path(sae_run).unlink(missing_ok=True)
    return metrics


def _write_outputs(params: Params, trainer: Trainer, sae_run: SAERun, shared: dict) -> dict:
    paths = sae_outputs(params.train.out_dir, sae_run.key, sae_run.cfg)
    state = trainer.state(sae_run)
    save_torch(state, paths["checkpoint"])
    save_saelens(
        sae_run.sae.folded(trainer.scale).cpu(),
        paths["saelens"],
        {
            "model_name": trainer.meta["model"],
            "hook_name": trainer.meta["hook"],
            "hook_head_index": None,
            "prepend_bos": True,
            "context_size": trainer.meta["n_ctx"],
            "dataset_path": trainer.meta["dataset"],
        },
    )
    tokens = sae_run.step * sae_run.batch_tokens
    final = sae_run.curve[-1] if sae_run.curve else {}
    metrics = {
        "config": params_to_dict(sae_run.cfg),
        "name": sae_run.name,
        "hook": trainer.meta["hook"],
        "d_in": sae_run.sae.d_in,
        "d_sae": sae_run.sae.d_sae,
        "n_params": sum(p.numel() for p in sae_run.sae.parameters()),
        "batch_tokens": sae_run.batch_tokens,
        "steps": sae_run.step,
        "steps_per_epoch": sae_run.steps_per_epoch,
        "tokens_seen": tokens,
        "train_time_s": sae_run.train_seconds,
        "time_per_step_s": sae_run.train_seconds / max(sae_run.step, 1),
        "tokens_per_s": tokens / sae_run.train_seconds if sae_run.train_seconds else None,
        "final_step": {k: final.get(k) for k in ("loss", "mse", "l1", "decorrelation", "l0")},
        "loss_per_epoch": [
            total / sae_run.steps_per_epoch for total in state["epoch_loss_sums"]
        ],  # mean of the training loss over each epoch's steps
        "skipped_fp16_steps": state["skipped_steps"],
        **shared,
    }
    write_json(paths["train_metrics"], metrics)
    write_text(paths["curve"], _tsv(sae_run.curve))
    return metrics


def _tsv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CURVE_COLUMNS, delimiter="\t", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
