"""Stage `export` (run by hand, not part of dvc.yaml): a config's latents in a format another tool reads.

`--format neuronpedia`: the dashboard batches SAE-Dashboard's neuronpedia runner writes (pipeline/export), from
the config's feature browser, its SAE and the model, into `<train.out_dir>/export/neuronpedia/<name>/`.
"""

from __future__ import annotations

import logging

from pipeline.analyze.browser import is_browser_folder, read_browser_data
from pipeline.analyze.logits import vocabulary_of
from pipeline.artifacts import export_folder, sae_name, sae_outputs, trained_sae
from pipeline.core.atomic import atomic_path, check_replaceable
from pipeline.core.device import resolve_device
from pipeline.core.errors import PipelineError
from pipeline.export.neuronpedia import (
    dashboard_batches,
    is_export_folder,
    layer_of,
    neuronpedia_model_id,
    write_batches,
)
from pipeline.model import model_of_store
from pipeline.params import Params
from pipeline.store import ActivationStore

FORMATS = ("neuronpedia",)
FEATURES_PER_BATCH = 128  # SAE-Dashboard's default n_features_per_batch
log = logging.getLogger(__name__)


def run(params: Params, which: str, fmt: str, model_id: str | None = None) -> list[str]:
    """Export the configs named by `which`; returns the folders written."""
    if fmt not in FORMATS:
        raise PipelineError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    configs = params.sae_configs(which)
    for key, cfg in configs.items():  # before any work: every input there, no folder of someone else's replaced
        check_replaceable(export_folder(params.train.out_dir, fmt, sae_name(key, cfg)), is_export_folder)
        browser = sae_outputs(params.train.out_dir, key, cfg)["browser"]
        if not is_browser_folder(browser):
            raise PipelineError(f"no feature browser for sae.{key} at {browser}: run `pipeline analyze --config {key}`")
    store = ActivationStore(params.extract.store)
    if store.is_synthetic:
        raise PipelineError("a synthetic store has no model whose tokens and logits Neuronpedia could show")
    device = resolve_device(params.train.device)
    vocabulary = vocabulary_of(model_of_store(params.model, store), device)
    n_docs = len(store.doc_offsets(params.analyze.split)) - 1
    written = []
    for key, cfg in configs.items():
        name, hook = sae_name(key, cfg), params.hook_of(key)
        browser = read_browser_data(sae_outputs(params.train.out_dir, key, cfg)["browser"])
        meta = {
            "model_id": model_id or neuronpedia_model_id(store.attrs["model"]),
            "layer": layer_of(hook),
            "sae_set": name,
            "dataset": store.attrs["dataset"],
            "n_prompts_total": n_docs,
        }
        sae = trained_sae(params, key, store).to(device)
        batches, skipped = dashboard_batches(browser, sae, vocabulary, meta, FEATURES_PER_BATCH)
        folder = export_folder(params.train.out_dir, fmt, name)
        with atomic_path(folder, is_export_folder) as tmp:
            tmp.mkdir()
            write_batches(tmp, batches, skipped, meta | {"hook": hook, "split": params.analyze.split,
                                                         "features_per_batch": FEATURES_PER_BATCH})  # fmt: skip
        log.info("sae.%s: %d Neuronpedia batches (%d latents that never fired left out) in %s", key, len(batches),
                 len(skipped), folder)  # fmt: skip
        written.append(str(folder))
    return written
