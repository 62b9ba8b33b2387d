"""Stage `train`: SAEs from the activation store, one shared read of the data for every config.

Under torchrun (train.nproc > 1) the ranks share the work as `train.distribute` says: `data`, every rank trains
every config on its slice of each batch and rank 0 writes; `configs`, every rank trains and writes its own
configs (keys in order, dealt round-robin) on the same stream, as the reference report trained A, B and C on
three GPUs.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from pipeline.artifacts import checkpoint_dir, sae_name, sae_outputs
from pipeline.core import distributed
from pipeline.core.atomic import check_replaceable, save_torch, write_json, write_text
from pipeline.core.device import amp_dtype, describe, peak_memory_bytes, reset_peak_memory, resolve_device
from pipeline.core.errors import PipelineError
from pipeline.core.locks import exclusive_lock
from pipeline.label.documents import selected
from pipeline.label.label_set import LabelSet
from pipeline.params import DocumentsConfig, GuideConfig, Params, SAEConfig, params_to_dict
from pipeline.probe.guide import fit_guide_probe
from pipeline.saes.saelens import is_saelens_folder, save_saelens
from pipeline.store import ActivationStore
from pipeline.synth.stream import SyntheticStream, is_streamed
from pipeline.train.checkpoints import checkpoint_files, remove_checkpoints
from pipeline.train.loader import ActivationLoader, TrainingBlocks
from pipeline.train.trainer import CURVE_COLUMNS, SAERun, Trainer

log = logging.getLogger(__name__)


def run(params: Params, which: str = "all", resume: bool = False) -> dict[str, dict]:
    """Train the configs named by `which` ("all" or a key of `sae`); returns their details (every rank's)."""
    cfg = params.train
    configs = _this_ranks_configs(params.sae_configs(which), cfg.distribute)
    writes = cfg.distribute == "configs" or distributed.is_main()
    checkpoints = checkpoint_dir(cfg.out_dir)
    with ExitStack() as locks:
        for key, sae_cfg in configs.items() if writes else ():
            # before any work: never replace a folder that is not ours, nor let two runs write one checkpoint
            check_replaceable(sae_outputs(cfg.out_dir, key, sae_cfg)["saelens"], is_saelens_folder)
            locks.enter_context(exclusive_lock(checkpoints / sae_name(key, sae_cfg)))
        details = _train(params, configs, checkpoints, resume, writes)
        distributed.barrier()  # every output written before any rank reports success
    return {key: value for each in distributed.all_gather(details) for key, value in each.items()}


def _this_ranks_configs(configs: dict[str, SAEConfig], distribute: str) -> dict[str, SAEConfig]:
    world = distributed.world_size()
    if world == 1 or distribute == "data":
        return configs
    if world > len(configs):
        raise PipelineError(
            f"train.distribute=configs deals {len(configs)} config(s) ({', '.join(configs)}) to {world} processes; "
            f"use at most {len(configs)} processes, or train.distribute=data"
        )
    keys = list(configs)[distributed.rank() :: world]
    return {key: configs[key] for key in keys}


def _train(
    params: Params, configs: dict[str, SAEConfig], checkpoints: Path, resume: bool, writes: bool
) -> dict[str, dict]:
    """Every config, one hook at a time: the configs at one hook share one read of it (a transcoder's, of its
    input and target hooks together), and those trained on one reasoning task (`documents`) one read of its
    documents."""
    groups = [(hook, target, keys) for (hook, target), at_hook in params.by_reads(configs).items()
              for keys in _by_task(configs, at_hook)]  # fmt: skip
    details = {}
    for hook, target, keys in groups:
        at_hook = {key: configs[key] for key in keys}
        details |= _train_at_hook(params, hook, target, at_hook, checkpoints, resume, writes, len(groups) == 1)
    return details


def _by_task(configs: dict[str, SAEConfig], keys: list[str]) -> list[list[str]]:
    """`keys` grouped by the documents each trains on, in order of first appearance."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(json.dumps(params_to_dict(configs[key].documents), sort_keys=True), []).append(key)
    return list(groups.values())


def _train_at_hook(
    params: Params,
    hook: str,
    target: str | None,
    configs: dict[str, SAEConfig],
    checkpoints: Path,
    resume: bool,
    writes: bool,
    alone: bool,
) -> dict[str, dict]:
    cfg = params.train
    store = ActivationStore(params.extract.store)
    device = resolve_device(cfg.device)
    started = time.perf_counter()
    reset_peak_memory(device)
    guided = {key: c.guide for key, c in configs.items() if c.guide is not None and c.guide.coeff > 0}
    task = next(iter(configs.values())).documents  # the configs of one call share it
    label_set = _label_set(store, params, [*guided, *([] if task is None else configs)])
    labels, tasks = _guide_labels(label_set, params.train.split, guided)
    documents = None if task is None else _task_documents(label_set, params.train.split, task, list(configs))
    loader = _loader(store, params, hook, target, device, labels, documents)
    guides = {key: (fit_guide_probe(loader, labels[:, tasks.index(g.task)], g.task, label_set.tasks[g.task],
                                    params.probe.max_per_class, cfg.seed), tasks.index(g.task))
              for key, g in guided.items()}  # fmt: skip
    meta = {
        "hook": hook,
        **({"target_hook": target} if target else {}),
        "store": str(store.path),
        "store_fingerprint": store.fingerprint,
        "model": store.attrs["model"],
        "dataset": store.attrs["dataset"],
        "n_ctx": store.attrs["n_ctx"],
        "loader_order": loader.order_kind,
        **({} if task is None else {"documents": task.describe(), "n_documents": int(documents.sum())}),
    }
    trainer = Trainer(configs, loader, cfg, checkpoints, meta, data_parallel=cfg.distribute == "data", guides=guides)
    resumed = trainer.resume() if resume else []
    fresh = [r.name for r in trainer.runs if r.name not in resumed]
    if resume and fresh and writes:
        log.warning("--resume: no checkpoint of %s in %s, so it trains from the start", ", ".join(fresh), checkpoints)
    stale = [
        r.name
        for r in trainer.runs
        if not resume and writes and any(path.is_file() for path in checkpoint_files(checkpoints, r.name))
    ]
    if stale:
        log.warning("starting over: checkpoints of an interrupted run of %s exist (--resume continues it)", stale)
    if resumed:
        log.info("resumed %s", ", ".join(resumed))
    else:
        log.info("input scale factor %.4g (E||scale*x||^2 = d_in)", trainer.estimate_scale())
    log.info(
        "training %s on %d tokens of %s/%s (%s, device %s)",
        ", ".join(r.name for r in trainer.runs),
        loader.n_tokens,
        cfg.split,
        hook if target is None else f"{hook} -> {target}",
        "resident in memory" if loader.resident_on_device else loader.order_kind,
        device,
    )
    trainer.fit()
    wall = time.perf_counter() - started
    peak, peak_kind = peak_memory_bytes(device)
    shared = {
        "trained_with": [r.key for r in trainer.runs],
        "command": params.command,
        "run_wall_time_s": wall,
        "loader_stall_s": loader.stall_seconds,
        "loader_order": loader.order_kind,
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "peak_memory_scope": "the whole train run (all configs in it)" if alone else "the configs at its hook",
        "device": str(device),
        "hardware": describe(device),
        "amp": str(amp_dtype(cfg.amp, device) or "none (float32)").removeprefix("torch."),
        "scale_factor": trainer.scale,
        **({"target_scale_factor": trainer.target_scale} if target else {}),
        "n_training_tokens_per_epoch": loader.n_tokens,
        **{name: meta[name] for name in ("documents", "n_documents") if name in meta},  # a reasoning task's
        "processes": distributed.world_size(),
        "distribute": cfg.distribute if distributed.world_size() > 1 else None,
    }
    if not writes:  # data-parallel, not rank 0: rank 0 holds the same SAEs and writes them
        return {}
    details = {}
    for sae_run in trainer.runs:
        details[sae_run.key] = _write_outputs(params, trainer, sae_run, shared)
    for sae_run in trainer.runs:  # the final outputs now hold everything the periodic checkpoints held
        remove_checkpoints(trainer.checkpoint_dir, sae_run.name)
    return details


def _label_set(store: ActivationStore, params: Params, needing: list[str]) -> LabelSet | None:
    """The store's token labels, checked against its training split's tokens, where configs `needing` them (guided,
    or on a reasoning task) are trained; None where none is."""
    if not needing:
        return None
    if store.is_synthetic:
        raise PipelineError(f"sae.{needing[0]}: a synthetic store has no token labels (guide, documents)")
    labels = LabelSet(params.probe.labels)
    labels.check(store.attrs.get("token_sha256", {}), params.train.split)
    return labels


def _guide_labels(labels: LabelSet | None, split: str, guided: dict[str, GuideConfig]) -> tuple:
    """The token labels guided configs read, one column per task ([n_tokens, n_tasks] int8), and the tasks; none
    without guided configs."""
    if not guided:
        return None, []
    tasks = list(dict.fromkeys(g.task for g in guided.values()))
    for key, g in guided.items():
        if g.task not in labels.tasks:
            raise PipelineError(f"unknown label task {g.task!r} in sae.{key}.guide.task; the labels have: "
                                f"{', '.join(labels.tasks)}")  # fmt: skip
    found = labels.tokens(split)
    return np.stack([found[task] for task in tasks], axis=1), tasks


def _task_documents(labels: LabelSet, split: str, task: DocumentsConfig, keys: list[str]) -> np.ndarray:
    """Which documents of the training split belong to the configs' reasoning task (from the token labels)."""
    chosen = selected(labels.documents(split), task)
    if not chosen.any():
        raise PipelineError(f"sae.{keys[0]}.documents ({task.describe()}): no document of split {split!r} "
                            "belongs to it")  # fmt: skip
    return chosen


def _loader(
    store: ActivationStore, params: Params, hook: str, target: str | None, device: torch.device,
    labels: np.ndarray | None = None, documents: np.ndarray | None = None,
) -> TrainingBlocks:  # fmt: skip
    """What the configs at `hook` train on: the store's split (its task's documents, with the guides' token
    labels), or a streamed synthetic split's generator."""
    cfg = params.train
    if not is_streamed(store, cfg.split):
        return ActivationLoader(store, cfg.split, hook, device, cfg.seed, cfg.exclude_bos, cfg.memory_budget_gb,
                                target_hook=target, columns=labels, documents=documents)  # fmt: skip
    if target is not None:
        raise PipelineError(f"{store.path} streams synthetic samples of one hook; a transcoder needs two")
    return SyntheticStream(store, device, cfg.seed)


def _write_outputs(params: Params, trainer: Trainer, sae_run: SAERun, shared: dict) -> dict:
    paths = sae_outputs(params.train.out_dir, sae_run.key, sae_run.cfg)
    state = trainer.state(sae_run)
    save_torch(state, paths["checkpoint"])
    save_saelens(
        sae_run.sae.folded(trainer.scale, trainer.target_scale).cpu(),
        paths["saelens"],
        {
            "model_name": trainer.meta["model"],
            "hook_name": trainer.meta["hook"],
            **({"hook_name_out": trainer.meta["target_hook"]} if "target_hook" in trainer.meta else {}),
            "hook_head_index": None,
            "prepend_bos": True,
            "context_size": trainer.meta["n_ctx"],
            "dataset_path": trainer.meta["dataset"],
            "training_tokens": sae_run.step * sae_run.batch_tokens,
        },
    )
    tokens = sae_run.step * sae_run.batch_tokens
    final = sae_run.curve[-1] if sae_run.curve else {}
    details = {
        "config": params_to_dict(sae_run.cfg),
        "name": sae_run.name,
        "hook": trainer.meta["hook"],
        **({"target_hook": trainer.meta["target_hook"]} if "target_hook" in trainer.meta else {}),
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
        "final_step": {k: final.get(k) for k in ("loss", "mse", "l1", "decorrelation", "l0")}
        | ({"guide": final["guide"]} if "guide" in final else {}),
        "loss_per_epoch": [
            total / sae_run.steps_per_epoch for total in state["epoch_loss_sums"]
        ],  # mean of the training loss over each epoch's steps
        "skipped_fp16_steps": state["skipped_steps"],
        **({"sparsity_coefficient": state["sparsity_coefficient"]} if "sparsity_coefficient" in state else {}),
        **({"guide_probe": _guide_record(sae_run)} if sae_run.guide is not None else {}),
        **shared,
    }
    write_json(paths["train_details"], details)
    write_json(paths["train_metrics"], {
        "final_loss": details["final_step"]["loss"],
        "final_mse": details["final_step"]["mse"],
        "final_l0": details["final_step"]["l0"],
        "tokens_per_s": details["tokens_per_s"],
    })  # fmt: skip
    write_text(paths["curve"], _tsv(sae_run.key, sae_run.curve))
    return details


def _guide_record(sae_run: SAERun) -> dict:
    """What a guided run's frozen probe reads: its task and the classes it has logits for."""
    guide = sae_run.guide
    return {"task": guide.task, "classes": [guide.classes[c] for c in guide.present]}


def _tsv(key: str, rows: list[dict]) -> str:
    """The curve with a `config` column, so that DVC's plot of every config's curves can tell them apart."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=("config", *CURVE_COLUMNS), delimiter="\t", extrasaction="ignore")
    writer.writeheader()
    writer.writerows({"config": key, **row} for row in rows)
    return buffer.getvalue()
