"""The Python API: load what the pipeline wrote and use it in a notebook or script.

    from pipeline.api import load_model, load_sae, open_store, run_with_sae

    sae, cfg = load_sae("artifacts/sae/config_c_8x")       # ours, or a SAELens standard/topk/jumprelu folder
    store = open_store("data/activations")                  # checked: every file present at its recorded size
    x = torch.from_numpy(store.read_rows("test", cfg["hook_name"], 0, 512)).float()
    f = sae.encode(x)                                       # latent activations [512, d_sae]
    x_hat = sae.decode(f)
    model = load_model(store.attrs["model"])                # the model the store was extracted from
    logits = run_with_sae(model, sae, tokens, cfg["hook_name"])
    logits = run_with_transcoder(model, transcoder, tokens, cfg["hook_name"], cfg["hook_name_out"])

Everything here is a thin, stable name over the modules the stages use (`pipeline.saes`, `pipeline.store`,
`pipeline.model`, `pipeline.evaluate`), so a notebook computes exactly what `pipeline evaluate` computes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.evaluate.splice import splice_hook, transcoder_hooks
from pipeline.model import load_model as _load_model
from pipeline.params import ModelConfig
from pipeline.saes.base import SparseAutoencoder
from pipeline.saes.saelens import load_saelens
from pipeline.store import ActivationStore

__all__ = ["load_model", "load_sae", "open_store", "run_with_sae", "run_with_transcoder"]


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> tuple[SparseAutoencoder, dict[str, Any]]:
    """An SAE or transcoder folder (`cfg.json` + `sae_weights.safetensors`), in inference mode on `device`, and
    its config.

    The config's `hook_name` (top level, and under `metadata` for ours) names the activation it reads; a
    transcoder's `hook_name_out` the one it predicts (`d_out` wide).
    """
    sae, config = load_saelens(path)
    return sae.to(device), {**config.get("metadata", {}), **config}


def open_store(path: str | Path) -> ActivationStore:
    """A finished activation store (a local path, or an object-store URL such as `s3://bucket/prefix`):
    `tokens(split)`, `doc_offsets(split)`, `read_rows(split, hook, start, end)`, `attrs` (how it was made),
    `truth()` on a synthetic store."""
    return ActivationStore(path)


def load_model(name: str, device: str = "auto", dtype: str = "auto", revision: str | None = None):
    """A model through TransformerLens's TransformerBridge, as the extract stage loads it (hub id or local dir)."""
    return _load_model(ModelConfig(name=name, revision=revision, device=device, dtype=dtype))


def run_with_sae(
    model, sae: SparseAutoencoder, tokens: torch.Tensor, hook: str, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits [batch, pos, vocab] of `model` on `tokens` [batch, pos] with the activation at `hook` replaced by
    the SAE's reconstruction at every position but the first (BOS), as `pipeline evaluate` splices it."""
    reconstruct = sae.to(next(model.parameters()).device)
    return _run(model, tokens, attention_mask, [(hook, splice_hook(lambda x: reconstruct(x)[0]))])


def run_with_transcoder(
    model,
    transcoder: SparseAutoencoder,
    tokens: torch.Tensor,
    hook: str,
    target_hook: str,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits of `model` with `target_hook`'s activation replaced by the transcoder's prediction from the same
    pass's `hook` activation (e.g. an MLP replaced by its transcoder), at every position but BOS."""
    predict = transcoder.to(next(model.parameters()).device)
    return _run(model, tokens, attention_mask, transcoder_hooks(hook, target_hook, lambda x: predict(x)[0]))


def _run(model, tokens: torch.Tensor, attention_mask: torch.Tensor | None, hooks: list) -> torch.Tensor:
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    mask = torch.ones_like(tokens) if attention_mask is None else attention_mask.to(device)
    with torch.inference_mode():
        return model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=hooks, return_type="logits")
