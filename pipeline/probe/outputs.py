"""What `pipeline probe` writes per config (artifacts/probe/config_<key>_<n>x/), and reading it back."""

from __future__ import annotations

import json
from pathlib import Path

PROBE_FILE = "probe.json"  # every problem's probes (stages/probe.py)
LATENTS_FILE = "latents.json"  # each latent's best label and its AUROC: what the feature browser shows
SAEBENCH_FILE = "sparse_probing_eval_results.json"  # SAEBench's layout (pipeline/probe/saebench.py)


def is_probe_folder(path: Path) -> bool:
    """Whether `path` holds a config's probe results (which a new run may replace)."""
    return (Path(path) / PROBE_FILE).is_file()


def read_latent_labels(folder: Path, d_sae: int) -> dict | None:
    """The latents' labels in a probe folder: {"labels": names, "best_label": index per latent, "auroc": per
    latent}; None where there are none, or they are for an SAE of another width."""
    path = Path(folder) / LATENTS_FILE
    if not path.is_file():
        return None
    found = json.loads(path.read_text())
    return found if len(found["auroc"]) == d_sae else None
