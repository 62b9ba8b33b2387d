"""Stage `evaluate`: each trained SAE on the held-out split: reconstruction, sparsity, and splice scores."""

from __future__ import annotations

import json
import logging

from pipeline.artifacts import sae_outputs, trained_sae
from pipeline.core.atomic import write_json
from pipeline.core.device import resolve_device
from pipeline.core.progress import progress_bars
from pipeline.evaluate.ground_truth import ground_truth_metrics
from pipeline.evaluate.reconstruction import reconstruction_metrics
from pipeline.evaluate.saebench import core_output, latent_statistics, saebench_cfg, weight_statistics
from pipeline.evaluate.splice import splice_scores
from pipeline.model import model_of_store
from pipeline.params import Params, params_to_dict, resolved
from pipeline.saes.base import SparseAutoencoder
from pipeline.saes.saelens import SAELENS_CONFIG
from pipeline.store import ActivationStore
from pipeline.synth.generator import SyntheticModel
from pipeline.train.loader import ActivationLoader

log = logging.getLogger(__name__)


def run(params: Params, which: str = "all") -> dict[str, dict]:
    """Evaluate the configs named by `which` ("all" or a key of `sae`); returns their details."""
    ev = params.evaluate
    store = ActivationStore(params.extract.store)
    tokens, offsets = store.tokens(ev.split), store.doc_offsets(ev.split)
    n_docs = len(offsets) - 1 if ev.n_docs is None else min(ev.n_docs, len(offsets) - 1)
    device = resolve_device(params.train.device)
    saes = {key: trained_sae(params, key, store).to(device) for key in params.sae_configs(which)}
    groups = params.by_reads(saes)  # (hook, a transcoder's target hook or None): one read of each

    def loader_of(reads: tuple[str, str | None]) -> ActivationLoader:
        loader = ActivationLoader(store, ev.split, reads[0], device, params.train.seed, params.train.exclude_bos,
                                  params.train.memory_budget_gb, target_hook=reads[1])  # fmt: skip
        if not loader.resident_on_device:
            log.info("%s/%s is larger than train.memory_budget_gb: %s", ev.split, reads, loader.order_kind)
        return loader

    loader = loader_of(next(iter(groups)))  # every hook of a split has the same tokens
    totals = {"reconstruction": loader.n_tokens * len(saes), "SAEBench statistics": loader.n_tokens * len(saes)}
    if not store.is_synthetic:  # synthetic data has no model to splice into; it has true features instead
        totals["splice"] = int(offsets[n_docs] - offsets[0]) * len(groups)
        model = model_of_store(params.model, store)
        log.info("splicing %s into the model on %d %s documents", ", ".join(saes), n_docs, ev.split)
    splices, reconstructions, latents = {key: None for key in saes}, {}, {}
    with progress_bars(totals) as bars:
        for (hook, target), keys in groups.items():  # one pass over the hook's activations, one splice per hook
            loader = loader if (loader.hook, loader.target_hook) == (hook, target) else loader_of((hook, target))
            if not store.is_synthetic:  # a transcoder replaces its target by its prediction from its input hook
                splices |= splice_scores(
                    model,
                    tokens,
                    offsets[: n_docs + 1],
                    target or hook,
                    {key: (lambda x, sae=saes[key]: sae(x)[0]) for key in keys},
                    ev.batch_tokens,
                    on_batch=bars["splice"].advance,
                    source_hook=hook if target else None,
                )
            for key in keys:
                blocks = loader.epoch(0, ev.batch_tokens, reuse_memory=True)  # each used before the next is read
                reconstructions[key] = reconstruction_metrics(
                    saes[key], blocks, ev.dense_threshold, bars["reconstruction"].advance
                )
                latents[key] = latent_statistics(
                    saes[key], loader.in_order(ev.batch_tokens), offsets, bars["SAEBench statistics"].advance
                )
    truths = _ground_truth(store, saes, device) if store.is_synthetic else {key: None for key in saes}
    details = {}
    for key in saes:
        cfg = params.sae[key]
        rec, splice, truth = reconstructions[key], splices[key], truths[key]
        details[key] = {
            "config": params_to_dict(resolved(cfg, params.train)),
            "hook": params.hook_of(key),
            **({"target_hook": params.sae[key].target_hook} if params.sae[key].target_hook else {}),
            "split": ev.split,
            "command": params.command,
            "reconstruction": rec,
            "splice": splice,
            "ground_truth": truth,
            "flags": rec["flags"] + (splice["flags"] if splice else []),
        }
        for flag in details[key]["flags"]:
            log.warning("sae.%s: %s", key, flag)
        paths = sae_outputs(params.train.out_dir, key, cfg)
        write_json(paths["eval_details"], details[key])
        saelens_cfg = json.loads((paths["saelens"] / SAELENS_CONFIG).read_text())
        saebench = core_output(details[key], latents[key], weight_statistics(saes[key]),
                               saebench_cfg(saelens_cfg, saes[key]),
                               _saebench_config(store, n_docs, params.train.exclude_bos))  # fmt: skip
        write_json(paths["saebench_core"], saebench)
        write_json(paths["eval_metrics"], {
            "explained_variance": rec["explained_variance"],
            "normalized_mse": rec["normalized_mse"],
            "l0": rec["l0"],
            "dead_latents": rec["dead_latents"],
            **({"ce_loss_score": splice["ce_loss_score"], "kl_score": splice["kl_score"]} if splice else {}),
            **({"mcc": truth["mcc"], "f1": truth["f1"]} if truth else {}),
        })  # fmt: skip
    return details


def _saebench_config(store: ActivationStore, n_docs: int, exclude_bos: bool) -> dict:
    """SAEBench's `CoreEvalConfig` for this evaluation: every splice document is one prompt of one batch, a whole
    document of up to n_ctx tokens (not packed)."""
    spliced = not store.is_synthetic
    return {
        "model_name": store.attrs.get("model") or "",
        "llm_dtype": store.attrs.get("compute_dtype") or "float32",
        "batch_size_prompts": n_docs if spliced else 0,
        "n_eval_reconstruction_batches": 1 if spliced else 0,
        "n_eval_sparsity_variance_batches": 1,
        "dataset": store.attrs.get("dataset") or "synthetic",
        "context_size": int(store.attrs.get("n_ctx") or 1),
        "compute_kl": spliced,
        "compute_ce_loss": spliced,
        "compute_l2_norms": True,
        "compute_sparsity_metrics": True,
        "compute_variance_metrics": True,
        "compute_featurewise_density_statistics": True,
        "compute_featurewise_weight_based_metrics": True,
        "exclude_special_tokens_from_reconstruction": exclude_bos,
        "verbose": False,
    }


def _ground_truth(store: ActivationStore, saes: dict[str, SparseAutoencoder], device) -> dict[str, dict]:
    """Each SAE against the store's true features, on fresh samples from the same generator."""
    cfg = store.attrs["synthetic"]
    model = SyntheticModel.from_arrays(store.truth(), device)
    log.info("ground truth: %s against %d true features on %d fresh samples", ", ".join(saes), model.n_features,
             cfg["eval_samples"])  # fmt: skip
    return ground_truth_metrics(saes, model, cfg["eval_samples"], cfg["seed"])
