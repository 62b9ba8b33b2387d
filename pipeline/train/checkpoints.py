"""What a training checkpoint holds, where it is kept, and when a run may resume from one.

A checkpoint is a plain dict of tensors and numbers (loadable with `torch.load(weights_only=True)`): the SAE, its
optimiser and GradScaler, the step, the settings it was trained with, the input scale and what it was trained on.
Each config keeps its latest checkpoint (`<name>.pt`) and the one before it (`<name>.previous.pt`): a run stopped
between writing the new one and moving it into place resumes from the one before, and a latest checkpoint damaged
after the fact (a disk fault, a bad copy) is reported, left where it is, and can be stepped back from. A run
resumes only when nothing that changes what is learned differs; every difference is named.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipeline.core.atomic import load_torch, save_torch
from pipeline.core.errors import DamagedFile, PipelineError
from pipeline.params import SETTINGS_BEFORE, TrainConfig, params_to_dict

if TYPE_CHECKING:
    from pipeline.train.trainer import SAERun

# Settings that do not change what is learned: --resume accepts a change to these and refuses any other.
RESUMABLE_CHANGES = (  # settings that change how a run is computed, not what it computes (beyond rounding)
    "device", "memory_budget_gb", "log_every", "checkpoint_every", "out_dir", "nproc", "distribute", "torch_compile",
)  # fmt: skip

log = logging.getLogger(__name__)


def checkpoint_files(directory: Path, name: str) -> tuple[Path, Path]:
    """The latest checkpoint of config `name` and the one before it."""
    return directory / f"{name}.pt", directory / f"{name}.previous.pt"


def save_checkpoint(state: dict[str, Any], directory: Path, name: str) -> None:
    """Write the latest checkpoint atomically; the one it replaces becomes the previous one."""
    latest, previous = checkpoint_files(directory, name)
    save_torch(state, latest, previous=previous)


def read_checkpoint(directory: Path, name: str) -> dict[str, Any] | None:
    """The latest checkpoint of config `name` (the previous one when the latest was never moved into place), or
    None. A damaged one is an error that says what to do, and is left where it is."""
    latest, previous = checkpoint_files(directory, name)
    if latest.is_file():
        path, fallback = latest, previous if previous.is_file() else None
    elif previous.is_file():
        log.warning("%s: the latest checkpoint was not completed; resuming from the one before it", name)
        path, fallback = previous, None
    else:
        return None
    try:
        return load_torch(path)
    except DamagedFile as exc:
        step_back = f"move it away and rerun with --resume to continue from the one before it ({fallback}), or "
        raise PipelineError(
            f"checkpoint {exc}; it is left where it is. To go on, {step_back if fallback else ''}rerun without "
            "--resume to start over"
        ) from None


def remove_checkpoints(directory: Path, name: str) -> None:
    for path in checkpoint_files(directory, name):
        path.unlink(missing_ok=True)


def checkpoint_state(run: SAERun, train: TrainConfig, scale: float, meta: dict[str, Any]) -> dict[str, Any]:
    """Everything needed to resume `run` or to use its SAE."""
    return {
        "sae": run.sae.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "step": run.step,
        "config": params_to_dict(run.cfg),
        "train": params_to_dict(train),
        "scale": scale,
        "d_in": run.sae.d_in,
        "d_sae": run.sae.d_sae,
        "meta": meta,
        "train_seconds": run.train_seconds,
        "skipped_steps": int(run.skipped_steps.item()),
        "epoch_loss_sums": [float(v) for v in run.epoch_loss_sums],
        "curve": run.curve,
        **({} if run.coefficient is None else {"sparsity_coefficient": float(run.coefficient)}),
        **({} if run.guide is None else {"guide": run.guide.state()}),
    }


def check_resumable(state: dict[str, Any], run: SAERun, train: TrainConfig, meta: dict[str, Any], path: Path) -> None:
    """Refuse (naming every difference) a checkpoint trained with other settings or on other data."""
    if state["d_in"] != run.sae.d_in or state["meta"].get("hook") != meta.get("hook"):
        raise PipelineError(
            f"checkpoint {path} is for {state['meta'].get('hook')} with d_in={state['d_in']}, but the store's "
            f"{meta.get('hook')} has d_in={run.sae.d_in}; rerun without --resume to start over"
        )
    config, train_now = params_to_dict(run.cfg), params_to_dict(train)
    differences = _differences(f"sae.{run.key}", _predated(state["config"], config, run.sae.settings), config, ())
    differences += _differences("train", _predated(state["train"], train_now, ()), train_now, RESUMABLE_CHANGES)
    if state["meta"].get("store_fingerprint") != meta.get("store_fingerprint"):
        differences.append(f"the activation store's content ({meta.get('store')}) changed")
    then, now = state["meta"].get("loader_order", "resident"), meta.get("loader_order", "resident")
    if then != now:  # train.memory_budget_gb decides it
        differences.append(f"the loader's order: {then} then, {now} now (set by train.memory_budget_gb)")
    if differences:
        raise PipelineError(
            f"cannot --resume from {path}: it was trained with other settings ({'; '.join(differences)}); "
            "rerun without --resume to start over"
        )


def restore(run: SAERun, state: dict[str, Any]) -> None:
    """Put `run` where the checkpoint left it."""
    device = run.skipped_steps.device
    run.sae.load_state_dict(state["sae"])
    # This device's Adam implementation (fused on CUDA), not that of the device that saved the checkpoint.
    built = run.optimizer.state_dict()["param_groups"]
    saved = state["optimizer"]
    groups = [
        group | {k: own[k] for k in ("fused", "foreach")}
        for group, own in zip(saved["param_groups"], built, strict=True)
    ]
    run.optimizer.load_state_dict(saved | {"param_groups": groups})
    run.scaler.load_state_dict(state["scaler"])
    run.step = state["step"]
    run.timer.total = state["train_seconds"]
    run.skipped_steps = torch.tensor(state["skipped_steps"], device=device)
    run.epoch_loss_sums = list(state["epoch_loss_sums"])
    run.curve = list(state["curve"])
    if run.coefficient is not None:
        run.coefficient.fill_(state["sparsity_coefficient"])


def _predated(saved: dict, now: dict, used: tuple[str, ...]) -> dict:
    """`saved` with the settings it predates filled in: their value before they existed where the SAE uses them,
    else their value now (the resolved config holds what applies, so the train section's cannot have mattered)."""
    missing = {k: SETTINGS_BEFORE[k] if k in used else now.get(k) for k in SETTINGS_BEFORE if k not in saved}
    return saved | missing


def _differences(section: str, saved: dict, now: dict, ignored: tuple[str, ...]) -> list[str]:
    keys = sorted((set(saved) | set(now)) - set(ignored))
    return [f"{section}.{k}: {saved.get(k)!r} then, {now.get(k)!r} now" for k in keys if saved.get(k) != now.get(k)]
