"""The language model through TransformerLens 4 (`TransformerBridge`): loading, hook checks, capture."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from transformer_lens.model_bridge import TransformerBridge

from pipeline.attention import fuse_attention
from pipeline.core.device import compute_dtype, resolve_device
from pipeline.core.errors import PipelineError, first_line
from pipeline.core.location import looks_local
from pipeline.params import ModelConfig
from pipeline.store import ActivationStore

_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.")
log = logging.getLogger(__name__)


_shared: dict[tuple, TransformerBridge] | None = None  # models loaded in a `sharing_models` block


@contextmanager
def sharing_models() -> Iterator[None]:
    """Within the block, `load_model` loads each model once and hands the same one to every stage that asks
    (`pipeline run`: extraction, evaluation and analysis share one load). Outside, every call loads afresh: a
    checkpoint may change on disk between two runs of one process."""
    global _shared
    outer, _shared = _shared, {}
    try:
        yield
    finally:
        _shared = outer


def load_model(cfg: ModelConfig) -> TransformerBridge:
    """Boot `cfg.name` (hub id or local HF checkpoint directory) on the configured device and dtype."""
    key = (cfg.name, cfg.revision, cfg.process_weights, cfg.device, cfg.dtype, cfg.attn_implementation)
    if _shared is not None and key in _shared:
        return _shared[key]
    model = _boot(cfg)
    if _shared is not None:
        _shared[key] = model
    return model


def _boot(cfg: ModelConfig) -> TransformerBridge:
    import transformers

    if not log.isEnabledFor(logging.DEBUG):  # our own progress bars are the ones that matter
        transformers.utils.logging.disable_progress_bar()
    device = resolve_device(cfg.device)
    dtype = compute_dtype(cfg.dtype, device)
    if looks_local(cfg.name) and not Path(cfg.name).expanduser().is_dir():
        raise PipelineError(f"model.name directory {cfg.name} does not exist")
    try:
        model = TransformerBridge.boot_transformers(cfg.name, device=device, dtype=dtype, revision=cfg.revision)
    except Exception as exc:  # hub, filesystem and config errors all mean "could not get this model"
        raise PipelineError(
            f"model {cfg.name!r} could not be loaded: {type(exc).__name__}: {first_line(exc)}. "
            "Offline? Point model.name at a local directory holding an HF checkpoint and its tokenizer"
        ) from exc
    if cfg.process_weights:
        model.enable_compatibility_mode()
    model.eval()
    if cfg.attn_implementation == "sdpa":
        fuse_attention(model)
    if model.tokenizer is None:
        raise PipelineError(f"model {cfg.name!r} has no tokenizer")
    return model


def check_hooks(model: TransformerBridge, hooks: Sequence[str]) -> int:
    """Validate hook names; return the number of blocks the deepest one needs (for stopping early)."""
    n_layers = model.cfg.n_layers
    valid = set(model.hook_dict)
    deepest = 0
    for hook in hooks:
        match = _BLOCK_HOOK.match(hook)
        if match and int(match.group(1)) >= n_layers:
            raise PipelineError(f"hook {hook!r}: layer {match.group(1)} is beyond the model's {n_layers} layers")
        if hook not in valid:
            examples = ", ".join(f"blocks.0.{n}" for n in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post"))
            raise PipelineError(
                f"unknown hook {hook!r}; valid hooks are blocks.<0..{n_layers - 1}>.<name> (e.g. {examples}), "
                f"{', '.join(sorted(h for h in valid if not h.startswith('blocks.'))[:8])}, ..."
            )
        deepest = max(deepest, int(match.group(1)) + 1 if match else n_layers)
    return deepest


def capture(
    model: TransformerBridge,
    tokens: torch.Tensor,
    attention_mask: torch.Tensor,
    hooks: Sequence[str],
    stop_at_layer: int,
) -> dict[str, torch.Tensor]:
    """One forward pass that records every hook in `hooks` and stops after block `stop_at_layer - 1`."""
    captured: dict[str, torch.Tensor] = {}

    def recorder(name: str) -> Callable:
        def record(activation: torch.Tensor, hook) -> None:
            captured[name] = activation

        return record

    stop = stop_at_layer if stop_at_layer < model.cfg.n_layers else None
    with torch.inference_mode():
        model.run_with_hooks(
            tokens,
            attention_mask=attention_mask,
            fwd_hooks=[(name, recorder(name)) for name in hooks],
            stop_at_layer=stop,
            return_type=None,
        )
    return captured


def hub_revision(model: TransformerBridge, cfg: ModelConfig) -> str | None:
    """The exact checkpoint revision when the hub reports one, else what was asked for."""
    hf_config = getattr(getattr(model, "original_model", None), "config", None)
    return getattr(hf_config, "_commit_hash", None) or cfg.revision


def model_of_store(cfg: ModelConfig, store: ActivationStore) -> TransformerBridge:
    """The model the store was extracted from (checked by name, mode and shape): for splicing, logit effects and
    token text."""
    for key, stored in (("name", store.attrs["model"]), ("process_weights", store.attrs["process_weights"])):
        if getattr(cfg, key) != stored:
            raise PipelineError(f"model.{key} is {getattr(cfg, key)!r} but {store.path} was extracted with {stored!r}")
    model = load_model(cfg)
    found = {"d_model": int(model.cfg.d_model), "n_ctx": int(model.cfg.n_ctx)}
    expected = {key: int(store.attrs[key]) for key in found}
    if found != expected:
        raise PipelineError(
            f"model {cfg.name!r} now has {found}, but {store.path} was extracted from a model with "
            f"{expected}: the checkpoint under that name changed; re-extract with `pipeline extract --force`"
        )
    return model
