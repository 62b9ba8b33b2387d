"""Saving and loading SAEs in SAELens's folder layout: `cfg.json` + `sae_weights.safetensors`.

SAELens loads our saved folders for every architecture (checked with SAELens 6.54 in an environment of its own;
it pins transformer-lens<4): each architecture is saved as the SAELens architecture whose formula its tensors
follow (`saelens_architecture`), with our architecture name and options in the metadata, from which we restore it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from pipeline.core.atomic import atomic_path
from pipeline.core.errors import PipelineError
from pipeline.params import TrainConfig
from pipeline.saes import sae_class
from pipeline.saes.base import SparseAutoencoder

SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_CONFIG = "cfg.json"
SAVED = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip")  # tensors saved for users, where the SAE has them
SAELENS_NAMES = {  # SAELens's name -> ours, to load a folder SAELens wrote
    "standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "transcoder": "relu", "skip_transcoder": "relu",
    "jumprelu_transcoder": "jumprelu", "jumprelu_skip_transcoder": "jumprelu",
}  # fmt: skip
TRANSCODER_PREFIXES = {"standard": "", "jumprelu": "jumprelu_"}  # SAELens's transcoder classes, by formula


def save_saelens(sae: SparseAutoencoder, directory: str | Path, metadata: dict[str, Any]) -> None:
    """Write `cfg.json` + `sae_weights.safetensors` as SAELens's `SAE.load_from_disk` reads them.

    The metadata (model_name, hook_name, ...) is written at the top level as well as under "metadata": SAELens 6
    reads a cfg.json without a `sae_lens_version` through its pre-6.0 path, which takes these keys from the top
    level.
    """
    options = {name: list(v) if isinstance(v, tuple) else v for name, v in sae.option_values().items()}
    metadata = {**metadata, "architecture": sae.name, **options}
    config = {
        **metadata,
        "architecture": saelens_architecture(sae),
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        **({"d_out": sae.d_out} if sae.transcoder else {}),
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": not sae.transcoder,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": metadata,
    }
    if sae.saelens_architecture == "topk":
        config["rescale_acts_by_decoder_norm"] = False
    state = sae.state_dict()
    weights = {name: state[name].detach().float().cpu().contiguous() for name in SAVED if name in state}
    with atomic_path(directory, owned=is_saelens_folder) as tmp:
        tmp.mkdir()
        save_file(weights, tmp / SAELENS_WEIGHTS)
        (tmp / SAELENS_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def saelens_architecture(sae: SparseAutoencoder) -> str:
    """The SAELens class that loads `sae`'s folder: its formula's, or for a transcoder SAELens's transcoder of
    that formula (transcoder, skip_transcoder, jumprelu_transcoder, jumprelu_skip_transcoder). A top-k transcoder
    has no SAELens class: its folder says `topk_transcoder`, which this project loads and SAELens does not."""
    if not sae.transcoder:
        return sae.saelens_architecture
    skip = "skip_" if sae.skip else ""
    prefix = TRANSCODER_PREFIXES.get(sae.saelens_architecture, f"{sae.saelens_architecture}_")
    return f"{prefix}{skip}transcoder"


def is_saelens_folder(path: Path) -> bool:
    """Whether `path` holds an SAE folder (a cfg.json), which a new one may replace."""
    return (Path(path) / SAELENS_CONFIG).is_file()


def load_saelens(directory: str | Path) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """Read a folder written by `save_saelens`, or a SAELens standard/topk/jumprelu SAE (safetensors only).

    The SAE is returned in inference mode (a batchtopk SAE uses its threshold). Options a foreign folder does not
    record (a JumpReLU SAE's training bandwidth) take the params' defaults; they do not change inference.
    """
    directory = Path(directory)
    config = json.loads((directory / SAELENS_CONFIG).read_text())
    metadata = config.get("metadata") or {}
    cls = sae_class(metadata.get("architecture") or SAELENS_NAMES[config["architecture"]])
    defaults = TrainConfig()
    options = {}
    for name in cls.options:
        recorded = [v for v in (config.get(name), metadata.get(name)) if v is not None]
        options[name] = recorded[0] if recorded else getattr(defaults, name)
    saved = load_file(directory / SAELENS_WEIGHTS)
    shape = {"d_out": config["d_out"], "skip": "W_skip" in saved} if "d_out" in config else {}
    sae = cls(config["d_in"], config["d_sae"], **options, **shape).eval()
    expected = {name for name in SAVED if name in sae.state_dict()}
    if set(saved) != expected:
        raise PipelineError(
            f"{directory}: weights do not fit a {cls.name} SAE (holds {sorted(saved)}, expected {sorted(expected)})"
        )
    sae.load_state_dict(saved, strict=False)
    return sae, config
