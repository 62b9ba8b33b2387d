"""Where every output of a run goes under `train.out_dir` (the paths dvc.yaml declares), and reading SAEs back.

artifacts/sae/config_<key>_<n>x_final.pt      checkpoint: weights, optimiser, step, settings (train)
artifacts/sae/config_<key>_<n>x/              the SAE in SAELens's layout, input scale folded in (train)
artifacts/details/train_<key>.json            everything the report shows about training (train)
artifacts/metrics/train_<key>.json            a few numbers for `dvc metrics` (train)
artifacts/plots/train_<key>.tsv               the training curve (train)
artifacts/details/eval_<key>.json             held-out metrics (evaluate)
artifacts/metrics/eval_<key>.json             a few of them for `dvc metrics` (evaluate)
artifacts/probe/config_<key>_<n>x/            probes on the token labels, SAEBench's sparse-probing JSON (probe)
artifacts/metrics/probe_<key>.json            a few of their numbers for `dvc metrics` (probe)
artifacts/browser/config_<key>_<n>x/          the feature browser (analyze)
artifacts/details/stability.json              feature stability of every pair of configs (stability)
artifacts/report.md, artifacts/report/        the report and its figures (report)
artifacts/checkpoints/                        periodic checkpoints of a run in progress (train --resume)
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.params import Params, SAEConfig
from pipeline.saes.base import SparseAutoencoder
from pipeline.saes.saelens import is_saelens_folder, load_saelens
from pipeline.store import ActivationStore


def sae_name(key: str, cfg: SAEConfig) -> str:
    """The file stem every artifact of one SAE config uses: `config_c_8x`, or `config_w_4096` for `d_sae: 4096`."""
    return f"config_{key}_{cfg.width_label}"


def sae_outputs(out_dir: str | Path, key: str, cfg: SAEConfig) -> dict[str, Path]:
    """Where each output of one SAE config goes.

    `*_metrics` hold a few numbers for `dvc metrics`/`dvc exp show`; `*_details` hold everything the report uses.
    """
    out, name = Path(out_dir), sae_name(key, cfg)
    return {
        "checkpoint": out / "sae" / f"{name}_final.pt",
        "saelens": out / "sae" / name,
        "train_metrics": out / "metrics" / f"train_{key}.json",
        "train_details": out / "details" / f"train_{key}.json",
        "curve": out / "plots" / f"train_{key}.tsv",
        "eval_metrics": out / "metrics" / f"eval_{key}.json",
        "eval_details": out / "details" / f"eval_{key}.json",
        "saebench_core": out / "saebench" / "core" / f"{name}_eval_results.json",
        "probe": out / "probe" / name,
        "probe_metrics": out / "metrics" / f"probe_{key}.json",
        "browser": out / "browser" / name,
    }


def export_folder(out_dir: str | Path, fmt: str, name: str) -> Path:
    """Where `pipeline export --format fmt` writes one config's files."""
    return Path(out_dir) / "export" / fmt / name


def checkpoint_dir(out_dir: str | Path) -> Path:
    """Periodic checkpoints of runs in progress, and their locks."""
    return Path(out_dir) / "checkpoints"


def stability_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / "details" / "stability.json"


def report_paths(out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    figures = out / "report"
    return {
        "report": out / "report.md",
        "curves": figures / "training_curves.png",
        "frontier": figures / "l0_vs_explained_variance.png",
        "density": figures / "feature_density.png",
        "stability": figures / "feature_stability.png",
        "curves_table": figures / "curves.tsv",
    }


def trained_folder(params: Params, key: str) -> Path:
    """Config `key`'s trained SAE folder; an error saying how to make it when there is none."""
    folder = sae_outputs(params.train.out_dir, key, params.sae[key])["saelens"]
    if not is_saelens_folder(folder):
        raise PipelineError(f"no trained SAE for sae.{key} at {folder}; run `pipeline train --config {key}` first")
    return folder


def trained_sae(params: Params, key: str, store: ActivationStore) -> SparseAutoencoder:
    """Config `key`'s trained SAE, in inference mode, checked against its hook (`sae.<key>.hook`) and width."""
    folder = trained_folder(params, key)
    sae, cfg = load_saelens(folder)
    trained = (cfg["metadata"].get("hook_name"), cfg["metadata"].get("hook_name_out"))
    wanted = (params.hook_of(key), params.sae[key].target_hook)
    if trained != wanted or sae.d_in != store.d_model:
        names = {reads: " -> ".join(h for h in reads if h) for reads in (trained, wanted)}
        raise PipelineError(
            f"{folder} was trained on {names[trained]} (d_in={sae.d_in}); this stage reads {names[wanted]} of "
            f"{store.path} (d_model={store.d_model}): retrain it"
        )
    return sae.eval()
