"""Stage `probe`: what each config's SAE keeps of the reasoning's structure, from the token labels of
`pipeline label` on `probe.split` (default: `evaluate.split`); pipeline/probe: problems, probes, SAEBench's layout.

Per config, into artifacts/probe/config_<key>_<n>x/: `probe.json` (every problem: the dense probe's accuracy on
x and on x_hat, the k-sparse probes' accuracies and latents, the latents that best separate it), `latents.json`
(each latent's best label and its AUROC, which the feature browser shows) and `sparse_probing_eval_results.json`
(SAEBench's layout); and artifacts/metrics/probe_<key>.json. The sampled tokens of one hook are read once for the
configs at it, in store order through the loader (streamed where the split exceeds train.memory_budget_gb).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artifacts import sae_outputs, trained_sae
from pipeline.core.atomic import atomic_path, check_replaceable, write_json
from pipeline.core.device import resolve_device
from pipeline.core.errors import PipelineError
from pipeline.core.progress import progress_bars
from pipeline.evaluate.saebench import saebench_cfg
from pipeline.label.documents import selected
from pipeline.label.label_set import LabelSet
from pipeline.params import Params
from pipeline.probe.across import across_tasks
from pipeline.probe.fit import probe_problems
from pipeline.probe.outputs import LATENTS_FILE, PROBE_FILE, SAEBENCH_FILE, is_probe_folder
from pipeline.probe.problems import HALVES, document_halves, problems
from pipeline.probe.saebench import sparse_probing_output
from pipeline.probe.sample import READ_TOKENS, read_sample
from pipeline.saes.base import SparseAutoencoder
from pipeline.saes.saelens import SAELENS_CONFIG
from pipeline.store import ActivationStore
from pipeline.train.loader import ActivationLoader

log = logging.getLogger(__name__)


def run(params: Params, which: str = "all") -> dict[str, dict]:
    """Probe the configs named by `which`; returns their details."""
    pc = params.probe
    configs = params.sae_configs(which)
    for key, cfg in configs.items():
        check_replaceable(sae_outputs(params.train.out_dir, key, cfg)["probe"], is_probe_folder)
    store = ActivationStore(params.extract.store)
    if store.is_synthetic:
        log.info("%s holds synthetic data: no token labels to probe", store.path)
        return {key: _write(params, key, {"skipped": "a synthetic store has no documents to label"}) for key in configs}
    labels = LabelSet(pc.labels)
    split = pc.split or params.evaluate.split
    labels.check(store.attrs.get("token_sha256", {}), split)
    tasks = pc.tasks or labels.present
    unknown = sorted(set(tasks) - set(labels.tasks))
    if unknown:
        raise PipelineError(
            f"unknown label task {unknown[0]!r} in probe.tasks; the labels have: {', '.join(labels.tasks)}"
        )
    values = labels.tokens(split)
    offsets = store.doc_offsets(split)
    halves_of_documents = document_halves(len(offsets) - 1, pc.seed)
    halves = np.repeat(halves_of_documents, np.diff(offsets))  # per token
    found, skipped = problems({t: values[t] for t in tasks}, labels.tasks, halves, pc.min_positives, pc.max_per_class,
                              pc.seed)  # fmt: skip
    if not found:
        raise PipelineError(
            f"no class of {', '.join(tasks)} has {pc.min_positives} tokens in each half of split {split!r}, and as "
            "many others: lower probe.min_positives, or probe a larger split"
        )
    device = resolve_device(params.train.device)
    saes = {key: trained_sae(params, key, store).to(device) for key in configs}
    groups = params.by_reads(saes)
    sample = np.unique(np.concatenate([p.tokens[half] for p in found for half in HALVES]))
    log.info("probing %s on %d problems (%d of them skipped), %d sampled %s tokens", ", ".join(saes), len(found),
             len(skipped), len(sample), split)  # fmt: skip
    results = {}
    fitted = sum(len(p.tokens[half]) for p in found for half in HALVES) * len(groups)  # each problem's sample
    across = {task.describe(): selected(labels.documents(split), task) for task in pc.across}
    totals = {"probe: read": len(sample) * len(groups), "probe: fit": fitted}
    if across:  # one more pass over the split: the latents' firing on each task's tokens
        training = int(offsets[-1]) - (len(offsets) - 1) * params.train.exclude_bos  # BOS left out, as the loader does
        totals["probe: across tasks"] = training * len(groups)
    with progress_bars(totals) as bars:
        for (hook, target), keys in groups.items():
            loader = ActivationLoader(store, split, hook, device, params.train.seed, params.train.exclude_bos,
                                      params.train.memory_budget_gb, target_hook=target)  # fmt: skip
            at_hook = {key: saes[key] for key in keys}
            read = read_sample(loader, at_hook, sample, halves, params.train.memory_budget_gb,
                               bars["probe: read"].advance)  # fmt: skip
            results |= probe_problems(found, read, pc.k, bars["probe: fit"].advance)
            if across:
                token_documents = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
                for key, found_across in across_tasks(loader, at_hook, read, found, across, token_documents,
                                                      pc.min_positives, params.evaluate.batch_tokens,
                                                      bars["probe: across tasks"].advance).items():  # fmt: skip
                    results[key]["across"] = found_across | {"documents": {n: int(m.sum()) for n, m in across.items()}}
    meta = {
        "split": split, "corpus": Path(store.attrs["dataset"]).name, "labels": str(pc.labels),
        "command": params.command, "tasks": tasks, "absent_tasks": labels.record["absent"], "k": pc.k,
        "documents": {half: int((halves_of_documents == i).sum()) for i, half in enumerate(HALVES)},
        "settings": {"min_positives": pc.min_positives, "max_per_class": pc.max_per_class, "seed": pc.seed},
        "skipped": skipped,
    }  # fmt: skip
    return {key: _write(params, key, meta | {"hook": params.hook_of(key), **results[key]}, saes[key], store)
            for key in saes}  # fmt: skip


def _write(params: Params, key: str, details: dict[str, Any], sae: SparseAutoencoder | None = None,
           store: ActivationStore | None = None) -> dict:  # fmt: skip
    """The config's probe folder and metrics; returns the details written."""
    paths = sae_outputs(params.train.out_dir, key, params.sae[key])
    aurocs = details.pop("aurocs", None)
    across = details.pop("across", None)
    if across is not None:  # the counts in probe.json, each latent's figures in latents.json
        details["across_tasks"] = {"documents": across["documents"], "latents": across["latents"]}
    metrics = _metrics(details)
    with atomic_path(paths["probe"], owned=is_probe_folder) as tmp:
        tmp.mkdir()
        write_json(tmp / PROBE_FILE, details)
        if aurocs is not None:
            per_task = {} if across is None else {"tasks": across["tasks"]}
            write_json(tmp / LATENTS_FILE, _latents(details, np.stack(aurocs)) | per_task)
            cfg = saebench_cfg(json.loads((paths["saelens"] / SAELENS_CONFIG).read_text()), sae)
            write_json(tmp / SAEBENCH_FILE, sparse_probing_output(details, _saebench_config(params, store), cfg))
    write_json(paths["probe_metrics"], metrics)
    return details


def _latents(details: dict, aurocs: np.ndarray) -> dict:
    """Per latent, the problem it separates best (its label) and that AUROC: what the feature browser shows."""
    names = [f"{p['task']}={p['class']}" for p in details["problems"]]
    best = aurocs.argmax(axis=0)
    return {"labels": names, "best_label": best.tolist(),
            "auroc": [round(float(v), 4) for v in aurocs[best, np.arange(aurocs.shape[1])]]}  # fmt: skip


def _metrics(details: dict) -> dict[str, float]:
    """A few numbers for `dvc metrics`: means over the problems."""
    found = details.get("problems") or []
    if not found:
        return {}
    metrics = {"dense_x": np.mean([p["dense"]["x"] for p in found]),
               "dense_x_hat": np.mean([p["dense"]["x_hat"] for p in found])}  # fmt: skip
    for k in (1, 5, 20):
        if str(k) in found[0]["sparse"]:
            metrics[f"sparse_top_{k}"] = np.mean([p["sparse"][str(k)]["accuracy"] for p in found])
    return {name: float(value) for name, value in metrics.items()}


def _saebench_config(params: Params, store: ActivationStore) -> dict:
    """SAEBench's `SparseProbingEvalConfig` for this run, in its terms."""
    return {
        "random_seed": params.probe.seed,
        "probe_train_set_size": 2 * params.probe.max_per_class,
        "probe_test_set_size": 2 * params.probe.max_per_class,
        "context_length": int(store.attrs.get("n_ctx") or 1),
        "sae_batch_size": READ_TOKENS,
        "llm_batch_size": None,
        "llm_dtype": store.attrs.get("compute_dtype") or "float32",
        "model_name": store.attrs.get("model") or "",
        "lower_vram_usage": False,
    }
