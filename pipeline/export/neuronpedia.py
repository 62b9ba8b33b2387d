"""Neuronpedia's dashboard batches, as SAE-Dashboard's neuronpedia runner writes them, from what `analyze` found.

The layout is SAE-Dashboard's (`sae_dashboard/neuronpedia/neuronpedia_dashboard.py`: a batch is `model_id`,
`layer`, `sae_set`, `sae_id_suffix` and `features`, written as `batch-<i>.json` with `features_per_batch` latents
each; latents that never fired are left out and listed in `skipped_indexes.json`). Every value comes from the
feature browser's data (pipeline/analyze) or the SAE and the model:

- pos_str/pos_values, neg_str/neg_values: the browser's top and bottom direct logit effects
- frac_nonzero: the latent's firing frequency on the analysed split
- freq_hist_data_bar_values/heights: the browser's activation histogram (bin centres and counts)
- logits_hist_data_bar_values/heights: a histogram of the latent's direct logit effect over the whole vocabulary
- activations: the top examples (bin_min -1, bin_max the latent's maximum, bin_contains -1, as SAE-Dashboard marks
  them), then each activation interval's random examples (its bounds, and the share of the latent's firing tokens
  it holds): the context window's tokens, the latent's activation on each, and the index of the example's token
- neuron_alignment_*: the three largest decoder weights (signed, largest first, as SAE-Dashboard takes them), with
  abs(weight) / the row's L1 norm
- n_prompts_total: documents in the analysed split; n_tokens_in_prompt: tokens of a full context window
- correlated_neurons_*, correlated_features_*, decoder_weights_dist and vector: empty (not computed here; the
  last two are for attention heads and steering vectors)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.analyze.logits import Vocabulary, direct_logits
from pipeline.saes.base import SparseAutoencoder

ALIGNMENT_ROWS = 3  # SAE-Dashboard's feature tables show three rows
TOP_BIN = {"bin_min": -1, "bin_max": None, "bin_contains": -1}  # how SAE-Dashboard marks the top examples


def dashboard_batches(
    browser: dict[str, Any],
    sae: SparseAutoencoder,
    vocabulary: Vocabulary,
    meta: dict[str, Any],
    features_per_batch: int,
) -> tuple[list[dict[str, Any]], list[int]]:
    """The batches of every latent that fired, and the indices of those that never did."""
    decode = browser["vocab"]
    alive = [f for f in browser["features"] if f["frequency"] > 0]
    skipped = [f["id"] for f in browser["features"] if f["frequency"] == 0]
    features = []
    for start in range(0, len(alive), features_per_batch):
        chunk = alive[start : start + features_per_batch]
        ids = torch.tensor([f["id"] for f in chunk])
        with torch.no_grad():
            rows = sae.W_dec[ids.to(sae.W_dec.device)].detach().float()
            logits = direct_logits(rows, vocabulary).cpu()
        for feature, row, effect in zip(chunk, rows.cpu(), logits, strict=True):
            features.append(_feature(feature, row, effect, browser, decode, meta))
    batches = [
        {
            "model_id": meta["model_id"],
            "layer": meta["layer"],
            "sae_set": meta["sae_set"],
            "sae_id_suffix": None,
            "features": features[start : start + features_per_batch],
        }
        for start in range(0, len(features), features_per_batch)
    ]
    return batches, skipped


def neuronpedia_model_id(model_name: str) -> str:
    """The model's id on Neuronpedia, which follows TransformerLens's default alias (`gpt2-small` for
    `openai-community/gpt2`): that alias of the name or of its last part, else the last part as it is."""
    from transformer_lens.supported_models import MODEL_ALIASES, get_official_model_name

    last = Path(model_name).name
    for name in (model_name, last):
        try:
            aliases = MODEL_ALIASES.get(get_official_model_name(name))
        except ValueError:  # not a model TransformerLens knows by that name
            continue
        return aliases[0] if aliases else last
    return last


def layer_of(hook: str) -> int:
    """The block number of a hook name (blocks.N....), or 0 for a hook outside the blocks."""
    found = re.match(r"^blocks\.(\d+)\.", hook)
    return int(found.group(1)) if found else 0


def _feature(
    feature: dict, row: torch.Tensor, effect: torch.Tensor, browser: dict, decode: dict, meta: dict
) -> dict[str, Any]:
    logits = feature["logits"] or {"top": [], "bottom": []}
    bins = browser["histogram_bins"]
    width = feature["max"] / bins
    heights, edges = np.histogram(effect.numpy(), bins=bins)
    aligned = row.topk(min(ALIGNMENT_ROWS, len(row)))
    return {
        "feature_index": feature["id"],
        "neuron_alignment_indices": aligned.indices.tolist(),
        "neuron_alignment_values": _rounded(aligned.values),
        "neuron_alignment_l1": _rounded(aligned.values.abs() / row.abs().sum().clamp_min(1e-30)),
        "correlated_neurons_indices": [],
        "correlated_neurons_l1": [],
        "correlated_neurons_pearson": [],
        "correlated_features_indices": [],
        "correlated_features_l1": [],
        "correlated_features_pearson": [],
        "neg_str": [decode[str(token)] for token, _ in logits["bottom"]],
        "neg_values": [value for _, value in logits["bottom"]],
        "pos_str": [decode[str(token)] for token, _ in logits["top"]],
        "pos_values": [value for _, value in logits["top"]],
        "frac_nonzero": feature["frequency"],
        "freq_hist_data_bar_values": _rounded(torch.arange(bins) * width + width / 2),
        "freq_hist_data_bar_heights": [float(count) for count in feature["histogram"]],
        "logits_hist_data_bar_heights": heights.astype(float).tolist(),
        "logits_hist_data_bar_values": _rounded(torch.from_numpy((edges[:-1] + edges[1:]) / 2)),
        "n_prompts_total": meta["n_prompts_total"],
        "n_tokens_in_prompt": 2 * browser["window"] + 1,
        "dataset": meta["dataset"],
        "decoder_weights_dist": [],
        "activations": _activations(feature, browser, decode),
        "vector": [],
    }


def _activations(feature: dict, browser: dict, decode: dict) -> list[dict[str, Any]]:
    """The top examples, then each interval's, in SAE-Dashboard's activation records."""
    unit = feature["max"] / browser["activation_scale"]  # the browser stores thousandths of the maximum
    fired = sum(feature["histogram"])
    groups = [(TOP_BIN | {"bin_max": feature["max"]}, feature["top"])]
    for interval in feature["quantiles"]:
        low, high = interval["range"]
        groups.append(({"bin_min": low, "bin_max": high, "bin_contains": interval["count"] / max(fired, 1)},
                       interval["examples"]))  # fmt: skip
    return [
        bounds | {
            "tokens": [decode[str(token)] for token in ids],
            "values": [round(value * unit, 5) for value in acts],
            "qualifying_token_index": centre,
        }
        for bounds, examples in groups
        for _document, _position, centre, ids, acts in examples
    ]  # fmt: skip


def _rounded(values: torch.Tensor) -> list[float]:
    return [round(float(v), 5) for v in values]


def is_export_folder(path: Path) -> bool:
    """Whether `path` holds an export this stage wrote (which a new one may replace)."""
    return (Path(path) / "run_settings.json").is_file()


def write_batches(folder: Path, batches: list[dict], skipped: list[int], settings: dict) -> None:
    """`batch-<i>.json`, `skipped_indexes.json` and `run_settings.json` in `folder` (which must exist).

    `skipped_indexes.json` holds what SAE-Dashboard's runner writes there but its `log_sparsity` threshold: the
    latents left out here are those that never fired, not those below a threshold."""
    import json

    for i, batch in enumerate(batches):
        (folder / f"batch-{i}.json").write_text(json.dumps(batch, allow_nan=False))
    which = {"model_id": settings["model_id"], "layer": str(settings["layer"]), "sae_set": settings["sae_set"]}
    (folder / "skipped_indexes.json").write_text(json.dumps(which | {"skipped_indexes": skipped}))
    (folder / "run_settings.json").write_text(json.dumps(settings, indent=2))
