"""Stage `report`: artifacts/report.md and its PNG figures, every number read from the metrics files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline import plots
from pipeline.atomic import write_text
from pipeline.config import Params, sae_name, sae_outputs
from pipeline.errors import PipelineError
from pipeline.store import ActivationStore

log = logging.getLogger(__name__)

TIE_MARGIN = 0.01  # CE loss scores closer than this count as tied in the recommendation rule


def fmt(value) -> str:
    """The one way a number is written in the report (the tests check the report through it)."""
    if value is None:
        return "n/a"
    if isinstance(value, int):  # bool included
        return f"{value:,}"
    if abs(value) >= 1e4 or (value != 0 and abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:.4f}"


def report_paths(out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    figures = out / "report"
    return {
        "report": out / "report.md",
        "curves": figures / "training_curves.png",
        "frontier": figures / "l0_vs_explained_variance.png",
        "density": figures / "feature_density.png",
    }


def run(params: Params) -> Path:
    """Write the report for every config in params; returns its path."""
    metrics = {key: _read_metrics(params, key) for key in params.sae}
    store = ActivationStore(params.extract.store)
    paths = report_paths(params.train.out_dir)
    labels = {key: sae_name(key, cfg) for key, cfg in params.sae.items()}
    plots.training_curves(
        {labels[k]: sae_outputs(params.train.out_dir, k, params.sae[k])["curve"] for k in params.sae},
        paths["curves"],
    )
    plots.sparsity_fidelity(
        {labels[k]: (m["eval"]["reconstruction"]["l0"], m["eval"]["reconstruction"]["explained_variance"])
         for k, m in metrics.items()},
        paths["frontier"],
    )  # fmt: skip
    plots.feature_density(
        {labels[k]: m["eval"]["reconstruction"]["density_histogram"] for k, m in metrics.items()}, paths["density"]
    )
    write_text(paths["report"], render(params, metrics, store.attrs, labels))
    log.info("report written to %s", paths["report"])
    return paths["report"]


RANKINGS = (  # (metric group, metric, what it means): the first one defined for every config decides
    ("splice", "ce_loss_score", "CE loss score (share of the zero-ablation's CE damage the SAE avoids)"),
    ("splice", "kl_score", "KL score (share of the zero-ablation's KL damage the SAE avoids)"),
    ("reconstruction", "explained_variance", "held-out explained variance"),
)


def recommend(metrics: dict[str, dict]) -> tuple[str, str]:
    """The rule, applied: the best score of the first ranking defined for every config; near-ties go to lower L0."""
    group, metric, meaning = next(
        r for r in RANKINGS if all(m["eval"][r[0]][r[1]] is not None for m in metrics.values())
    )  # explained variance is always defined
    scores = {k: m["eval"][group][metric] for k, m in metrics.items()}
    best = max(scores.values())
    tied = [k for k, s in scores.items() if best - s <= TIE_MARGIN]
    choice = min(tied, key=lambda k: metrics[k]["eval"]["reconstruction"]["l0"])
    rule = (
        "Choose the config whose reconstruction costs the model least on the held-out split: the highest CE loss "
        "score, or where that is undefined for some config (zero-ablation does not raise the CE, as with random "
        "weights) the highest KL score, or failing that the highest explained variance. Scores within "
        f"{TIE_MARGIN} of the best are tied, and among them the sparsest (lowest held-out L0) wins. "
        f"Used here: {meaning}."
    )
    return choice, rule


def render(params: Params, metrics: dict[str, dict], store_attrs: dict, labels: dict[str, str]) -> str:
    """The Markdown text of the report."""
    any_train = next(iter(metrics.values()))["train"]
    stats = store_attrs.get("split_stats", {})
    lines = [
        "# SAE training report",
        "",
        f"Model `{store_attrs['model']}`, hook `{params.train.hook}` (d_in = {fmt(any_train['d_in'])}), "
        f"trained on split `{params.train.split}`, evaluated on held-out split `{params.evaluate.split}`. "
        f"Dataset `{store_attrs['dataset']}` (template `{store_attrs['template']!r}`, one BOS token per document).",
        "",
        "| split | documents | tokens (incl. BOS) | truncated documents |",
        "| --- | --- | --- | --- |",
        *[
            f"| {s} | {fmt(v['n_docs'])} | {fmt(v['n_tokens'])} | {fmt(v['n_truncated_docs'])} |"
            for s, v in stats.items()
        ],
        "",
        f"Hardware: {any_train['hardware']} (device `{any_train['device']}`), mixed precision: {any_train['amp']}.",
        "",
    ]
    for key, m in metrics.items():
        lines += _config_section(params, key, labels[key], m)
    lines += _comparison(params, metrics, labels)
    choice, rule = recommend(metrics)
    chosen = metrics[choice]["eval"]
    lines += [
        "## Recommendation",
        "",
        f"Rule: {rule}",
        "",
        f"**{labels[choice]}**: CE loss score {fmt(chosen['splice']['ce_loss_score'])}, KL score "
        f"{fmt(chosen['splice']['kl_score'])}, held-out L0 {fmt(chosen['reconstruction']['l0'])}, explained "
        f"variance {fmt(chosen['reconstruction']['explained_variance'])}.",
        "",
        *_caveats(params),
        "## Reproduce",
        "",
        "```",
        "pipeline run            # or: dvc repro",
        "pipeline train --config c -S sae.c.lr=5e-5 && pipeline evaluate --config c && pipeline report",
        "```",
        "",
        "## Definitions",
        "",
        "- Training loss = MSE + l1_coeff·L1 + decorrelation_coeff·decorrelation, on inputs scaled so that "
        "E‖x‖² = d_in; MSE is per element, L1 is the sum of latent activations per token (decoder rows have unit "
        "norm), decorrelation is the mean squared cosine between distinct decoder directions.",
        "- Loss per epoch: mean training loss over that epoch's steps. Final step: the values at the last step.",
        "- tokens/s = tokens seen / time inside this config's training steps; time/step = that time / steps.",
        "- Peak memory: CUDA allocator peak, or the process's peak RSS on CPU, over the whole train run "
        "(configs trained in one run share it).",
        "- Held-out metrics (BOS positions excluded): MSE per element; normalized MSE = mean ‖x−x̂‖²/‖x‖²; "
        "explained variance = 1 − Σ‖x−x̂‖²/Σ‖x−x̄‖²; cosine(x, x̂); shrinkage = mean ‖x̂‖/‖x‖; L0 = mean active "
        "latents per token; dead = never active on the split; dense = active on more than "
        f"{fmt(params.evaluate.dense_threshold)} of tokens.",
        "- Splice: the hook's activations (all but BOS) replaced by the reconstruction, by zeros, or untouched; "
        "CE loss score = (CE_zero − CE_sae)/(CE_zero − CE_clean); KL score = (KL_zero − KL_sae)/KL_zero, KL to "
        "the clean next-token distribution. A score is n/a when zero-ablation does not hurt the model (its "
        "denominator is not positive), e.g. with random weights.",
        "",
    ]
    return "\n".join(lines)


def _config_section(params: Params, key: str, label: str, m: dict) -> list[str]:
    train, rec, splice = m["train"], m["eval"]["reconstruction"], m["eval"]["splice"]
    cfg = params.sae[key]
    hyper = [
        ("expansion", f"{cfg.expansion}x"), ("d_sae", fmt(train["d_sae"])), ("parameters", fmt(train["n_params"])),
        ("batch size", f"{cfg.batch_size} × {params.train.seq_len} = {fmt(train['batch_tokens'])} tokens"),
        ("learning rate", fmt(cfg.lr)), ("epochs", fmt(cfg.epochs)), ("warmup", fmt(params.train.warmup_frac)),
        ("l1_coeff", fmt(params.train.l1_coeff)), ("decorrelation_coeff", fmt(params.train.decorrelation_coeff)),
    ]  # fmt: skip
    results = [
        ("steps", fmt(train["steps"])), ("tokens seen", fmt(train["tokens_seen"])),
        ("final-step loss", fmt(train["final_step"]["loss"])), ("final-step MSE", fmt(train["final_step"]["mse"])),
        ("final-step L1", fmt(train["final_step"]["l1"])),
        ("final-step decorrelation", fmt(train["final_step"]["decorrelation"])),
        ("train time (s)", fmt(train["train_time_s"])), ("tokens/s", fmt(train["tokens_per_s"])),
        ("skipped fp16 steps", fmt(train["skipped_fp16_steps"])),
        ("held-out explained variance", fmt(rec["explained_variance"])), ("held-out L0", fmt(rec["l0"])),
        ("dead latents", fmt(rec["dead_latents"])), ("CE loss score", fmt(splice["ce_loss_score"])),
    ]  # fmt: skip
    return [
        f"## Config {key.upper()}: {label}",
        "",
        "| hyperparameter | value |",
        "| --- | --- |",
        *[f"| {name} | {value} |" for name, value in hyper],
        "",
        "| result | value |",
        "| --- | --- |",
        *[f"| {name} | {value} |" for name, value in results],
        "",
    ]


def _comparison(params: Params, metrics: dict[str, dict], labels: dict[str, str]) -> list[str]:
    keys = list(metrics)
    header = "| | " + " | ".join(labels[k] for k in keys) + " |"
    rule = "| --- |" + " --- |" * len(keys)

    def row(name: str, values: list) -> str:
        return f"| {name} | " + " | ".join(fmt(v) for v in values) + " |"

    n_epochs = max(len(metrics[k]["train"]["loss_per_epoch"]) for k in keys)
    epoch_rows = [
        row(f"epoch {e + 1}", [(metrics[k]["train"]["loss_per_epoch"] + [None] * n_epochs)[e] for k in keys])
        for e in range(n_epochs)
    ]
    eval_fields = [
        ("explained variance", "reconstruction", "explained_variance"), ("MSE", "reconstruction", "mse"),
        ("normalized MSE", "reconstruction", "normalized_mse"), ("cosine", "reconstruction", "cosine"),
        ("shrinkage", "reconstruction", "shrinkage"), ("L0", "reconstruction", "l0"), ("L1", "reconstruction", "l1"),
        ("dead latents", "reconstruction", "dead_latents"), ("dense latents", "reconstruction", "dense_latents"),
        ("CE clean", "splice", "ce_clean"), ("CE with SAE", "splice", "ce_sae"),
        ("CE zero-ablated", "splice", "ce_zero"),
        ("CE loss score", "splice", "ce_loss_score"), ("KL with SAE", "splice", "kl_sae"),
        ("KL score", "splice", "kl_score"),
    ]  # fmt: skip
    cost_fields = [
        ("peak memory (bytes)", "peak_memory_bytes"), ("train time (s)", "train_time_s"),
        ("time/step (s)", "time_per_step_s"), ("tokens/s", "tokens_per_s"),
    ]  # fmt: skip
    paths = report_paths(".")
    return [
        "## Comparative analysis",
        "",
        "Mean training loss per epoch:",
        "",
        header,
        rule,
        *epoch_rows,
        "",
        f"Held-out evaluation (split `{params.evaluate.split}`):",
        "",
        header,
        rule,
        *[row(name, [metrics[k]["eval"][group][field] for k in keys]) for name, group, field in eval_fields],
        "",
        "Cost:",
        "",
        header,
        rule,
        *[row(name, [metrics[k]["train"][field] for k in keys]) for name, field in cost_fields],
        "",
        f"![training curves]({paths['curves'].relative_to('.')})",
        f"![L0 against explained variance]({paths['frontier'].relative_to('.')})",
        f"![feature density]({paths['density'].relative_to('.')})",
        "",
    ]


def _caveats(params: Params) -> list[str]:
    """Facts about the comparison that the numbers alone do not show, derived from the params."""
    lrs = {cfg.lr for cfg in params.sae.values()}
    batches = {cfg.batch_size for cfg in params.sae.values()}
    if len(lrs) == 1 and len(batches) == 1:
        return []
    return [
        "Note: the configs differ in learning rate and/or batch size as well as width "
        f"(learning rates {', '.join(fmt(c.lr) for c in params.sae.values())}; batch sizes "
        f"{', '.join(str(c.batch_size) for c in params.sae.values())}), so differences between them are not due "
        "to width alone.",
        "",
    ]


def _read_metrics(params: Params, key: str) -> dict:
    paths = sae_outputs(params.train.out_dir, key, params.sae[key])
    found = {}
    for kind, path in (("train", paths["train_metrics"]), ("eval", paths["eval_metrics"])):
        if not path.is_file():
            stage = "train" if kind == "train" else "evaluate"
            raise PipelineError(f"{path} is missing; run `pipeline {stage} --config {key}` first")
        found[kind] = json.loads(path.read_text())
    return found
