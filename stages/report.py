"""Stage `report`: artifacts/report.md and its figures, from the details files, the store's attributes and the
stability file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.artifacts import report_paths, sae_name, sae_outputs, stability_path
from pipeline.core.atomic import write_text
from pipeline.core.errors import PipelineError
from pipeline.params import Params
from pipeline.probe.outputs import PROBE_FILE
from pipeline.report import plots
from pipeline.report.render import curves_table, render
from pipeline.store import ActivationStore

log = logging.getLogger(__name__)


def run(params: Params) -> Path:
    """Write the report for every config in params; returns its path."""
    metrics = {key: _read_metrics(params, key) for key in params.sae}
    shares = _read(stability_path(params.train.out_dir), "stability")["shares"]
    if set(shares) != set(params.sae):
        raise PipelineError(
            f"{stability_path(params.train.out_dir)} compares configs {', '.join(shares)}, not this params file's "
            f"({', '.join(params.sae)}); run `pipeline stability` first"
        )
    store = ActivationStore(params.extract.store)
    paths = report_paths(params.train.out_dir)
    labels = {key: sae_name(key, cfg) for key, cfg in params.sae.items()}
    curves = {labels[k]: sae_outputs(params.train.out_dir, k, params.sae[k])["curve"] for k in params.sae}
    plots.training_curves(curves, paths["curves"])
    write_text(paths["curves_table"], curves_table(list(curves.values())))
    plots.sparsity_fidelity(
        {labels[k]: (m["eval"]["reconstruction"]["l0"], m["eval"]["reconstruction"]["explained_variance"])
         for k, m in metrics.items()},
        paths["frontier"],
    )  # fmt: skip
    plots.feature_density(
        {labels[k]: m["eval"]["reconstruction"]["density_histogram"] for k, m in metrics.items()}, paths["density"]
    )
    plots.stability(
        [[shares[a][b]["one_to_one"]["0.7"] if b in shares[a] else None for b in params.sae] for a in params.sae],
        list(labels.values()), 0.7, paths["stability"],
    )  # fmt: skip
    probes = {key: _read_probe(params, key) for key in params.sae}
    write_text(paths["report"], render(params, metrics, store.attrs, labels, shares, probes))
    log.info("report written to %s", paths["report"])
    return paths["report"]


def _read_metrics(params: Params, key: str) -> dict:
    paths = sae_outputs(params.train.out_dir, key, params.sae[key])
    return {"train": _read(paths["train_details"], f"train --config {key}"),
            "eval": _read(paths["eval_details"], f"evaluate --config {key}")}  # fmt: skip


def _read_probe(params: Params, key: str) -> dict | None:
    """Config `key`'s probe details, or None where `pipeline probe` has not run for it."""
    path = sae_outputs(params.train.out_dir, key, params.sae[key])["probe"] / PROBE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _read(path: Path, stage: str) -> dict:
    if not path.is_file():
        raise PipelineError(f"{path} is missing; run `pipeline {stage}` first")
    return json.loads(path.read_text())
