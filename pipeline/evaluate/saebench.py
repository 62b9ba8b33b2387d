"""SAEBench's core-eval output (`eval_type_id: "core"`): this project's evaluation where SAEBench's tools read it.

The file follows SAEBench's `CoreEvalOutput` (sae_bench/evals/core/eval_output.py, SAEBench 0.6.0). Its numbers
are this project's SAELens-convention values: the splice's `saelens_compatible` CE and KL figures (which equal
SAELens's own `run_evals` on the same model and tokens), `mse_per_token` for `mse`, and the reconstruction
metrics of pipeline/evaluate/reconstruction.py for explained variance, cosine, the L2 ratio, L0 and L1. The rest
is what SAEBench reports and the evaluation does not otherwise need, computed in one in-order pass
(`latent_statistics`) and from the weights (`weight_statistics`):

- l2_norm_in, l2_norm_out: mean ||x|| and ||x_hat||; relative_reconstruction_bias: mean ||x_hat||^2 divided by
  mean <x, x_hat> (Rajamanoharan et al. 2024, eq. 10)
- explained_variance_legacy: the mean over tokens of 1 - ||x - x_hat||^2 / ||x - m||^2, m the mean of the token's
  block of `evaluate.batch_tokens` tokens in store order (SAEBench centres on each batch of prompts)
- per latent: feature_density (share of tokens it fires on); consistent_activation_heuristic (tokens it fires on
  per document it fires in, where SAEBench counts prompts); the encoder's bias and norm, the cosine between its
  encoder and decoder directions, and its largest cosine with any other latent's encoder and decoder direction

A value that does not apply or is undefined is -1, SAEBench's own marker (it writes -1 for a NaN): a synthetic
store has no model to splice into, a latent that never fires has no consistent-activation heuristic, and a CE or
KL score is undefined where zero-ablating the hook barely changes the model's loss (docs/evaluation.md; SAEBench
itself would divide by that near-zero difference). Which scores are undefined, and why, is in
`eval_result_unstructured`. `sae_cfg_dict` is the SAE's SAELens cfg.json with its architecture by SAEBench's name
where SAEBench has one (a batchtopk SAE is saved in SAELens's jumprelu layout; SAEBench calls it batch_topk) and
the tokens it was trained on (`training_tokens`), which SAEBench's plots read.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.saes.base import SparseAutoencoder

NOT_APPLICABLE = -1.0
SAEBENCH_SCORE = {"ce_loss_score": "ce_loss_score", "kl_score": "kl_div_score"}  # our name -> SAEBench's
ABLATION_EFFECT = {  # the score -> (what zero-ablation changes, its mean, its standard error) in the splice details
    "ce_loss_score": ("CE", "ce_ablation_effect", "ce_ablation_effect_standard_error"),
    "kl_score": ("KL", "kl_zero", "kl_zero_standard_error"),
}
COSINE_ROWS = 1024  # latents compared with all others at a time, so that no d_sae x d_sae matrix is held


def latent_statistics(
    sae: SparseAutoencoder,
    blocks: Iterable[tuple[torch.Tensor, torch.Tensor]],
    doc_offsets: np.ndarray,
    on_block: Callable[[int], None] = lambda n_tokens: None,
) -> dict[str, Any]:
    """Norms, legacy explained variance and per-latent firing counts over `blocks` of (token positions, x) in
    store order (`ActivationLoader.in_order`), accumulated in float64."""
    sums = dict.fromkeys(("norm_in", "norm_out", "out_sq", "dot", "ev_legacy", "ev_tokens"), 0.0)
    fires = torch.zeros(sae.d_sae, dtype=torch.float64)
    documents = torch.zeros(sae.d_sae, dtype=torch.float64)  # documents each latent fires in
    open_doc, open_fired = -1, torch.zeros(sae.d_sae, dtype=torch.bool)  # the last document, maybe continued
    n = 0
    for positions, block in blocks:
        source, x = sae.input_and_target(block)
        with torch.no_grad():
            x_hat, f = sae(source)
        x, x_hat, fired = x.double(), x_hat.double(), (f > 0).cpu()
        sums["norm_in"] += x.norm(dim=1).sum().item()
        sums["norm_out"] += x_hat.norm(dim=1).sum().item()
        sums["out_sq"] += x_hat.pow(2).sum().item()
        sums["dot"] += (x * x_hat).sum().item()
        centred = (x - x.mean(dim=0)).pow(2).sum(dim=1)
        spread = centred > 0  # a token alone in its block has no variance to explain
        sums["ev_legacy"] += (1 - (x - x_hat).pow(2).sum(dim=1)[spread] / centred[spread]).sum().item()
        sums["ev_tokens"] += spread.sum().item()
        fires += fired.sum(dim=0)
        docs = np.searchsorted(doc_offsets, positions.numpy(), side="right") - 1
        unique, inverse = np.unique(docs, return_inverse=True)
        per_doc = torch.zeros(len(unique), sae.d_sae).index_add_(0, torch.from_numpy(inverse), fired.float()) > 0
        if unique[0] == open_doc:  # the previous block's last document goes on in this block
            per_doc[0] |= open_fired
        else:
            documents += open_fired
        documents += per_doc[:-1].sum(dim=0)
        open_doc, open_fired = int(unique[-1]), per_doc[-1]
        n += len(x)
        on_block(len(x))
    documents += open_fired
    heuristic = torch.where(documents > 0, fires / documents.clamp_min(1), NOT_APPLICABLE)
    return {
        "n_tokens": n,
        "l2_norm_in": sums["norm_in"] / n,
        "l2_norm_out": sums["norm_out"] / n,
        "relative_reconstruction_bias": sums["out_sq"] / sums["dot"],
        "explained_variance_legacy": sums["ev_legacy"] / sums["ev_tokens"] if sums["ev_tokens"] else NOT_APPLICABLE,
        "feature_density": (fires / n).tolist(),
        "consistent_activation_heuristic": heuristic.tolist(),
    }


def weight_statistics(sae: SparseAutoencoder) -> dict[str, list[float]]:
    """Per latent: encoder bias and norm, encoder-decoder cosine, and the largest cosine with another latent."""
    with torch.no_grad():
        encoder = sae.W_enc.detach().double().cpu().T  # [d_sae, d_in], one row per latent
        decoder = sae.W_dec.detach().double().cpu()
        return {
            "encoder_bias": sae.b_enc.detach().double().cpu().tolist(),
            "encoder_norm": encoder.norm(dim=1).tolist(),
            "encoder_decoder_cosine_sim": F.cosine_similarity(encoder, decoder, dim=1).tolist(),
            "max_encoder_cosine_sim": _max_cosine_with_others(encoder).tolist(),
            "max_decoder_cosine_sim": _max_cosine_with_others(decoder).tolist(),
        }


def _max_cosine_with_others(directions: torch.Tensor) -> torch.Tensor:
    unit = F.normalize(directions, dim=1)
    largest = torch.empty(len(unit), dtype=unit.dtype)
    for start in range(0, len(unit), COSINE_ROWS):
        cosines = unit[start : start + COSINE_ROWS] @ unit.T
        rows = torch.arange(len(cosines))
        cosines[rows, rows + start] = -torch.inf  # not with itself
        largest[start : start + COSINE_ROWS] = cosines.max(dim=1).values
    return largest


def core_output(
    details: dict[str, Any],
    latents: dict[str, Any],
    weights: dict[str, list[float]],
    sae_cfg: dict[str, Any],
    eval_config: dict[str, Any],
) -> dict[str, Any]:
    """The SAEBench core-eval JSON of one SAE from its evaluation `details` and the statistics above."""
    rec, splice = details["reconstruction"], details["splice"]
    saelens = splice["saelens_compatible"] if splice else None
    undefined = [name for name in ("ce_loss_score", "kl_score") if saelens and saelens[name] is None]
    density = np.asarray(latents["feature_density"])
    total = density.sum()
    metrics = {
        "model_behavior_preservation": {
            "kl_div_score": _or_missing(saelens, "kl_score"),
            "kl_div_with_ablation": _or_missing(saelens, "kl_zero"),
            "kl_div_with_sae": _or_missing(saelens, "kl_sae"),
        },
        "model_performance_preservation": {
            "ce_loss_score": _or_missing(saelens, "ce_loss_score"),
            "ce_loss_with_ablation": _or_missing(saelens, "ce_zero"),
            "ce_loss_with_sae": _or_missing(saelens, "ce_sae"),
            "ce_loss_without_sae": _or_missing(saelens, "ce_clean"),
        },
        "reconstruction_quality": {
            "explained_variance": rec["explained_variance"],
            "explained_variance_legacy": latents["explained_variance_legacy"],
            "mse": rec["mse_per_token"],
            "cossim": rec["cosine"],
        },
        "shrinkage": {
            "l2_norm_in": latents["l2_norm_in"],
            "l2_norm_out": latents["l2_norm_out"],
            "l2_ratio": rec["shrinkage"],
            "relative_reconstruction_bias": latents["relative_reconstruction_bias"],
        },
        "sparsity": {"l0": rec["l0"], "l1": rec["l1"]},
        "token_stats": {
            "total_tokens_eval_reconstruction": saelens["n_kl_tokens"] if saelens else 0,
            "total_tokens_eval_sparsity_variance": rec["n_tokens"],
        },
        "misc_metrics": {
            "freq_over_1_percent": float((density > 0.01).mean()),
            "freq_over_10_percent": float((density > 0.1).mean()),
            "normalized_freq_over_1_percent": float(density[density > 0.01].sum() / total) if total else 0.0,
            "normalized_freq_over_10_percent": float(density[density > 0.1].sum() / total) if total else 0.0,
            "average_max_encoder_cosine_sim": float(np.mean(weights["max_encoder_cosine_sim"])),
            "average_max_decoder_cosine_sim": float(np.mean(weights["max_decoder_cosine_sim"])),
            "frac_alive": float((density > 0).mean()),
        },
    }
    per_latent = {**weights, **{k: latents[k] for k in ("feature_density", "consistent_activation_heuristic")}}
    rows = [{"index": i, **{name: values[i] for name, values in per_latent.items()}} for i in range(len(density))]
    return saebench_output("core", eval_config, metrics, rows, sae_cfg, {
        "written_by": "gsm8k-sae-pipeline (pipeline evaluate)",
        "hook": details["hook"],
        "split": details["split"],
        "conventions": "SAELens's: see pipeline/evaluate/saebench.py for each field",
        "undefined_scores": {SAEBENCH_SCORE[name]: _why_undefined(saelens, name) for name in undefined},
    })  # fmt: skip


def saebench_output(eval_type: str, eval_config: dict, metrics: dict, details: list[dict], sae_cfg: dict,
                    unstructured: dict) -> dict[str, Any]:  # fmt: skip
    """The fields every SAEBench output has (SAEBench 0.6.0's `BaseEvalOutput`), around an eval's own."""
    return {
        "eval_type_id": eval_type,
        "eval_config": eval_config,
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": metrics,
        "eval_result_details": details,
        "sae_bench_commit_hash": "",  # not written by SAEBench: eval_result_unstructured says by what
        "sae_lens_id": None,
        "sae_lens_release_id": None,
        "sae_lens_version": None,
        "sae_cfg_dict": sae_cfg,
        "eval_result_unstructured": unstructured,
    }


def saebench_cfg(saelens_cfg: dict[str, Any], sae: SparseAutoencoder) -> dict[str, Any]:
    """The SAE's SAELens cfg.json with its architecture as SAEBench names it (see the module's docstring)."""
    named = sae.saebench_architecture if sae.saebench_architecture and not sae.transcoder else None
    return saelens_cfg | {"architecture": named or saelens_cfg["architecture"]}


def _why_undefined(saelens: dict[str, Any], name: str) -> str:
    what, mean, error = ABLATION_EFFECT[name]
    return (
        f"undefined, written as -1: zero-ablating the hook changes {what} by {saelens[mean]:.4f} nats "
        f"(± {saelens[error]:.4f}), below the {saelens['min_ablation_effect_nats']} nats / "
        f"{saelens['standard_errors']:g} standard errors this project needs to score against"
    )


def _or_missing(values: dict | None, key: str) -> float:
    """A value SAEBench requires: ours, or -1 where there is none or it is undefined."""
    return NOT_APPLICABLE if values is None or values[key] is None else values[key]
