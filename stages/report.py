"""Stage `report`: artifacts/report.md and its PNG figures, every number read from the metrics files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline import plots
from pipeline.atomic import write_text
from pipeline.config import Params, params_to_dict, sae_name, sae_outputs
from pipeline.errors import PipelineError
from pipeline.sae import load_saelens
from pipeline.stability import THRESHOLDS, stability
from pipeline.store import ActivationStore

log = logging.getLogger(__name__)

TIE_MARGIN = 0.01
ARCHITECTURE_SETTINGS = {  # the settings each architecture's loss and forward pass use (shown in its section)
    "relu": ("l1_coeff",), "topk": ("k", "k_aux", "aux_coeff", "dead_tokens"),
    "batchtopk": ("k", "k_aux", "aux_coeff", "dead_tokens"), "jumprelu": ("l0_coeff", "jumprelu_bandwidth"),
    "matryoshka": ("k", "matryoshka_prefixes", "aux_coeff", "dead_tokens"),
}  # fmt: skip  # CE loss scores closer than this count as tied in the recommendation rule


def fmt(value) -> str:
    """The one way a dimensionless number is written in the report (the tests check the report through these)."""
    if value is None:
        return "n/a"
    if isinstance(value, int):  # bool included
        return f"{value:,}"
    if abs(value) >= 1e4 or (value != 0 and abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:.4f}"


def fmt_seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.1f}"


def fmt_gb(n_bytes: int | None) -> str:
    return "n/a" if n_bytes is None else f"{n_bytes / 1e9:,.2f}"


def fmt_rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


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


def run(params: Params) -> Path:
    """Write the report for every config in params; returns its path."""
    metrics = {key: _read_metrics(params, key) for key in params.sae}
    store = ActivationStore(params.extract.store)
    paths = report_paths(params.train.out_dir)
    labels = {key: sae_name(key, cfg) for key, cfg in params.sae.items()}
    curves = {labels[k]: sae_outputs(params.train.out_dir, k, params.sae[k])["curve"] for k in params.sae}
    plots.training_curves(curves, paths["curves"])
    write_text(paths["curves_table"], _long_table(list(curves.values())))
    plots.sparsity_fidelity(
        {labels[k]: (m["eval"]["reconstruction"]["l0"], m["eval"]["reconstruction"]["explained_variance"])
         for k, m in metrics.items()},
        paths["frontier"],
    )  # fmt: skip
    plots.feature_density(
        {labels[k]: m["eval"]["reconstruction"]["density_histogram"] for k, m in metrics.items()}, paths["density"]
    )
    shares = feature_stability(params)
    plots.stability(
        [[None if a == b else shares[a, b]["one_to_one"]["0.7"] for b in params.sae] for a in params.sae],
        list(labels.values()), 0.7, paths["stability"],
    )  # fmt: skip
    write_text(paths["report"], render(params, metrics, store.attrs, labels, shares))
    log.info("report written to %s", paths["report"])
    return paths["report"]


def feature_stability(params: Params) -> dict[tuple[str, str], dict]:
    """Stability (pipeline/stability.py) of every ordered pair of configs, from their saved decoders."""
    decoders = {}
    for key, cfg in params.sae.items():
        sae, _ = load_saelens(sae_outputs(params.train.out_dir, key, cfg)["saelens"])
        decoders[key] = sae.W_dec.detach()
    keys, shares = list(decoders), {}
    for i, x in enumerate(keys):
        for y in keys[i + 1 :]:
            log.info("feature stability: %s against %s", x, y)
            both = stability(decoders[x], decoders[y])
            shares[x, y], shares[y, x] = both["x_in_y"], both["y_in_x"]
    return shares


SAELENS_SPLICE_ROWS = (
    ("CE clean (SAELens)", "ce_clean"), ("CE with SAE (SAELens)", "ce_sae"),
    ("CE zero-ablated (SAELens)", "ce_zero"), ("CE loss score (SAELens)", "ce_loss_score"),
    ("KL with SAE (SAELens)", "kl_sae"), ("KL zero-ablated (SAELens)", "kl_zero"), ("KL score (SAELens)", "kl_score"),
)  # fmt: skip

RANKINGS = (  # (metric group, metric, what it means, must lie in [0, 1]): the first usable one decides
    ("splice", "ce_loss_score", "CE loss score (share of the zero-ablation's CE damage the SAE avoids)", True),
    ("splice", "kl_score", "KL score (share of the zero-ablation's KL damage the SAE avoids)", True),
    ("ground_truth", "f1", "ground-truth F1 (latents as detectors of their best-matching true feature)", True),
    ("reconstruction", "explained_variance", "held-out explained variance", False),
)


def recommend(metrics: dict[str, dict]) -> tuple[str | None, str]:
    """The rule, applied: the best score of the first ranking usable for every config; near-ties go to lower L0.

    A config whose latents are all dead or all dense is not a sparse dictionary and is never recommended. A score
    is usable only where it is defined (the ablation's effect is beyond noise) and, for CE/KL scores, in [0, 1].
    """
    candidates = {k: m for k, m in metrics.items() if not _degenerate(m["eval"]["reconstruction"])}
    if not candidates:
        return None, (
            "No recommendation: in every config all latents are dead or all are dense, so none is a sparse "
            "dictionary (see the warnings)."
        )

    def usable(ranking: tuple, m: dict) -> bool:
        value = (m["eval"].get(ranking[0]) or {}).get(ranking[1])
        return value is not None and (not ranking[3] or 0 <= value <= 1)

    group, metric, meaning, _ = next(r for r in RANKINGS if all(usable(r, m) for m in candidates.values()))
    scores = {k: m["eval"][group][metric] for k, m in candidates.items()}
    best = max(scores.values())
    tied = [k for k, s in scores.items() if best - s <= TIE_MARGIN]
    choice = min(tied, key=lambda k: candidates[k]["eval"]["reconstruction"]["l0"])
    excluded = sorted(set(metrics) - set(candidates))
    rule = (
        "Choose the config whose reconstruction costs the model least on the held-out split: the highest CE loss "
        "score, or where that is not usable for some config (undefined because zero-ablation's effect on the CE is "
        "within noise, or outside [0, 1]) the highest KL score; on synthetic data (no model to splice into) the "
        "highest ground-truth F1; failing those the highest explained variance. "
        f"Scores within {TIE_MARGIN} of the best are tied, and among them the sparsest (lowest held-out L0) wins. "
        "Configs whose latents are all dead or all dense are excluded"
        f"{' (here: ' + ', '.join(excluded) + ')' if excluded else ''}. Used here: {meaning}."
    )
    return choice, rule


def _degenerate(reconstruction: dict) -> bool:
    d_sae = reconstruction["d_sae"]
    return reconstruction["dead_latents"] == d_sae or reconstruction["dense_latents"] == d_sae


def render(
    params: Params, metrics: dict[str, dict], store_attrs: dict, labels: dict[str, str], shares: dict | None = None
) -> str:
    """The Markdown text of the report."""
    any_train, any_eval = next(iter(metrics.values()))["train"], next(iter(metrics.values()))["eval"]
    stats = store_attrs.get("split_stats", {})
    lines = [
        "# SAE training report",
        "",
        f"Model `{store_attrs['model']}`, hook `{params.train.hook}` (d_in = {fmt(any_train['d_in'])}), "
        f"trained on split `{params.train.split}`, evaluated on held-out split `{params.evaluate.split}`. "
        f"Dataset `{store_attrs['dataset']}`"
        + (
            f" (template `{store_attrs['template']!r}`, one BOS token per document)."
            if "template" in store_attrs
            else ": synthetic samples with known features (every sample its own token, no BOS)."
        ),
        "",
        "| split | documents | tokens (incl. BOS) | truncated documents |",
        "| --- | --- | --- | --- |",
        *[
            f"| {s} | {fmt(v['n_docs'])} | {fmt(v['n_tokens'])} | {fmt(v.get('n_truncated_docs', 0))} |"
            for s, v in stats.items()
        ],
        "",
        f"Hardware: {any_train['hardware']} (device `{any_train['device']}`), mixed precision: {any_train['amp']}.",
        "",
    ]
    for key, m in metrics.items():
        lines += _config_section(params, key, labels[key], m)
    lines += _comparison(params, metrics, labels)
    lines += _stability_section(params, labels, shares or {})
    lines += _warnings(metrics, labels)
    choice, rule = recommend(metrics)
    lines += ["## Recommendation", "", rule if choice is None else f"Rule: {rule}", ""]
    if choice is not None:
        chosen = metrics[choice]["eval"]
        splice, truth = chosen["splice"] or {}, chosen.get("ground_truth") or {}
        scores = (f"CE loss score {fmt(splice.get('ce_loss_score'))}, KL score {fmt(splice.get('kl_score'))}"
                  if splice else f"ground-truth F1 {fmt(truth.get('f1'))}, MCC {fmt(truth.get('mcc'))}")  # fmt: skip
        lines += [
            f"**{labels[choice]}**: {scores}, held-out L0 {fmt(chosen['reconstruction']['l0'])}, explained "
            f"variance {fmt(chosen['reconstruction']['explained_variance'])}.",
            "",
        ]
    lines += [
        *_caveats(params),
        "## Reproduce",
        "",
        "The commands that produced these numbers (with the params file as it was then):",
        "",
        "```",
        *reproduce_commands(metrics, store_attrs, params.command),
        "```",
        "",
        "## Definitions",
        "",
        "- Training loss = MSE + decorrelation_coeff·decorrelation + the architecture's sparsity term "
        "(relu: l1_coeff·L1; jumprelu: l0_coeff·L0 through a straight-through estimator; topk, batchtopk, "
        "matryoshka: aux_coeff·AuxK, with matryoshka's MSE the mean over its nested prefixes), on inputs scaled so "
        "that E‖x‖² = d_in; MSE is per element, L1 is the sum of latent activations per token (decoder rows have "
        "unit norm), decorrelation is the mean squared cosine between distinct decoder directions.",
        "- Loss per epoch: mean training loss over that epoch's steps. Final step: the values at the last step.",
        "- tokens/s = tokens seen / time inside this config's own training steps (what its progress bar shows); "
        "time/step = that time / steps. Train time counts only those steps; configs trained in one run share "
        "the run's wall time.",
        "- Peak memory: CUDA allocator peak, or the process's peak RSS on CPU, over the whole train run "
        "(configs trained in one run share it).",
        "- Held-out metrics (BOS positions excluded): MSE per element; normalized MSE = mean ‖x−x̂‖²/‖x‖²; "
        "explained variance = 1 − Σ‖x−x̂‖²/Σ‖x−x̄‖²; cosine(x, x̂); shrinkage = mean ‖x̂‖/‖x‖; L0 = mean active "
        "latents per token; dead = never active on the split; dense = active on more than "
        f"{fmt(params.evaluate.dense_threshold)} of tokens.",
        *(_splice_definitions(any_eval["splice"]) if any_eval["splice"] else _ground_truth_definitions()),
        "",
    ]
    return "\n".join(lines)


def _splice_definitions(splice: dict) -> list[str]:
    return [
        "- Splice: the hook's activations (all but BOS) replaced by the reconstruction, by zeros, or untouched; "
        "CE loss score = (CE_zero − CE_sae)/(CE_zero − CE_clean); KL score = (KL_zero − KL_sae)/KL_zero, KL to "
        "the clean next-token distribution. A score is n/a when zero-ablation's effect (its denominator) is within "
        f"noise: not above {splice['min_ablation_effect_nats']} nats and {splice['standard_errors']:g} standard "
        "errors of its mean over tokens (e.g. a model with random weights). A score outside [0, 1] is listed under "
        "warnings.",
        "- SAELens convention (rows marked SAELens; SAELens's run_evals with BOS, EOS and padding ignored, as "
        "SAEBench's core evaluation calls it): the SAE replaces all but BOS, zero-ablation zeroes every position, "
        "CE is over the predictions made at positions 1..L−2 of each document and KL over positions 1..L−1; MSE "
        "per token = mean ‖x−x̂‖² (summed over d_in). Ours: CE and KL over the predictions at positions 0..L−2, and "
        "zero-ablation keeps BOS. The same noise rule applies to both.",
    ]


def _ground_truth_definitions() -> list[str]:
    return [
        "- Ground truth (synthetic data): MCC = mean |cos| of the optimal one-to-one matching (Hungarian) of "
        "decoder rows to true feature directions; each latent is a detector of its best-matching true feature, "
        "precision = P(feature active | latent fires), recall = P(latent fires | feature active), F1 their "
        "harmonic mean, averaged over latents that fired; uniqueness = distinct best-matching features / latents "
        "that fired. Measured on fresh samples from the store's generator. L0 was matched by k for topk, batchtopk "
        "and matryoshka, and by the sparsity coefficient set in the params for relu and jumprelu: compare rows at "
        "their measured L0.",
    ]


def _long_table(tsv_files: list[Path]) -> str:
    """Every config's curve in one table (each row names its config): what `dvc plots show` draws."""
    texts = [path.read_text().splitlines() for path in tsv_files]
    return "\n".join([texts[0][0], *(line for text in texts for line in text[1:])]) + "\n"


def _warnings(metrics: dict[str, dict], labels: dict[str, str]) -> list[str]:
    flagged = [(key, flag) for key, m in metrics.items() for flag in m["eval"]["flags"]]
    if not flagged:
        return []
    return ["## Warnings", "", *[f"- {labels[key]}: {flag}" for key, flag in flagged], ""]


def reproduce_commands(metrics: dict[str, dict], store_attrs: dict, report_command: str) -> list[str]:
    """The recorded command lines of every stage behind the report, in order, each once."""
    recorded = [store_attrs.get("command")]
    recorded += [m["train"].get("command") for m in metrics.values()]
    recorded += [m["eval"].get("command") for m in metrics.values()]
    recorded.append(report_command)
    return list(dict.fromkeys(c for c in recorded if c))


def _config_section(params: Params, key: str, label: str, m: dict) -> list[str]:
    train, rec, splice = m["train"], m["eval"]["reconstruction"], m["eval"]["splice"] or {}
    cfg = train["config"]  # as trained: per-config settings resolved against the train section
    hyper = [
        ("architecture", cfg["architecture"]),
        *[(name, _setting(cfg[name])) for name in ARCHITECTURE_SETTINGS[cfg["architecture"]]],
        ("expansion", f"{cfg['expansion']}x"), ("d_sae", fmt(train["d_sae"])), ("parameters", fmt(train["n_params"])),
        ("batch size", f"{cfg['batch_size']} × {params.train.seq_len} = {fmt(train['batch_tokens'])} tokens"),
        ("learning rate", fmt(cfg["lr"])), ("epochs", fmt(cfg["epochs"])), ("warmup", fmt(cfg["warmup_frac"])),
        ("decay", fmt(cfg["decay_frac"])), ("decorrelation_coeff", fmt(cfg["decorrelation_coeff"])),
    ]  # fmt: skip
    results = [
        ("steps", fmt(train["steps"])), ("tokens seen", fmt(train["tokens_seen"])),
        ("final-step loss", fmt(train["final_step"]["loss"])), ("final-step MSE", fmt(train["final_step"]["mse"])),
        ("final-step L1", fmt(train["final_step"]["l1"])),
        ("final-step decorrelation", fmt(train["final_step"]["decorrelation"])),
        ("train time (s)", fmt_seconds(train["train_time_s"])), ("tokens/s", fmt_rate(train["tokens_per_s"])),
        ("skipped fp16 steps", fmt(train["skipped_fp16_steps"])),
        ("held-out explained variance", fmt(rec["explained_variance"])), ("held-out L0", fmt(rec["l0"])),
        ("dead latents", fmt(rec["dead_latents"])), ("CE loss score", fmt(splice.get("ce_loss_score"))),
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
        _browser_link(params, key),
        "",
    ]


def _browser_link(params: Params, key: str) -> str:
    """A link to the config's feature browser, relative to the report (which sits in `train.out_dir`)."""
    page = sae_outputs(params.train.out_dir, key, params.sae[key])["browser"] / "index.html"
    if not page.is_file():
        return f"Feature browser: not built yet (`pipeline analyze --config {key}`)."
    link = page.relative_to(params.train.out_dir).as_posix()
    return f"Feature browser: [{link}]({link}) (top contexts, histograms and logit effects of every latent)."


def _setting(value) -> str:
    return ", ".join(fmt(v) for v in value) if isinstance(value, list) else fmt(value)


GROUND_TRUTH_ROWS = (
    ("MCC", "mcc"), ("F1", "f1"), ("precision", "precision"), ("recall", "recall"), ("uniqueness", "uniqueness"),
    ("latents that fired", "n_alive_latents"), ("true L0", "true_l0"), ("samples", "n_samples"),
)  # fmt: skip


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
        ("peak memory (GB)", "peak_memory_bytes", fmt_gb), ("train time (s)", "train_time_s", fmt_seconds),
        ("time/step (s)", "time_per_step_s", lambda v: "n/a" if v is None else f"{v:.3g}"),
        ("tokens/s", "tokens_per_s", fmt_rate),
    ]  # fmt: skip
    paths = report_paths(".")
    spliced = all(metrics[k]["eval"]["splice"] for k in keys)
    eval_fields = [f for f in eval_fields if f[1] == "reconstruction" or spliced]
    truth = [metrics[k]["eval"].get("ground_truth") for k in keys]
    return [
        "## Comparative analysis",
        "",
        header,
        rule,
        "| architecture | " + " | ".join(metrics[k]["train"]["config"]["architecture"] for k in keys) + " |",
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
        *(_saelens_rows(metrics, header, rule, row) if spliced else []),
        *(_ground_truth_rows(truth, header, rule, row) if all(truth) else []),
        "Cost:",
        "",
        header,
        rule,
        *[
            f"| {name} | " + " | ".join(form(metrics[k]["train"][field]) for k in keys) + " |"
            for name, field, form in cost_fields
        ],
        "",
        f"![training curves]({paths['curves'].relative_to('.')})",
        f"![L0 against explained variance]({paths['frontier'].relative_to('.')})",
        f"![feature density]({paths['density'].relative_to('.')})",
        "",
    ]


def _stability_section(params: Params, labels: dict[str, str], shares: dict) -> list[str]:
    if not shares:
        return []
    keys = list(params.sae)
    header = "| latents of ↓ found in → | " + " | ".join(labels[k] for k in keys) + " |"
    rule = "| --- |" + " --- |" * len(keys)

    def table(method: str) -> list[str]:
        def cell(x: str, y: str) -> str:
            if x == y:
                return "—"
            return " / ".join(fmt(shares[x, y][method][str(t)]) for t in THRESHOLDS)

        return [header, rule, *[f"| {labels[x]} | " + " | ".join(cell(x, y) for y in keys) + " |" for x in keys]]

    reseeded = [
        f"{labels[x]} and {labels[y]}" for i, x in enumerate(keys) for y in keys[i + 1 :]
        if _without_seed(params.sae[x]) == _without_seed(params.sae[y])
    ]  # fmt: skip
    seeds = (
        f"Pairs that differ only in their initial weights' seed: {', '.join(reseeded)}."
        if reseeded
        else "No two configs differ only in their seed; add one (e.g. a copy of config C with `init_seed: 1`) to "
        "measure seed stability."
    )
    return [
        "## Feature stability",
        "",
        "Share of each row config's latents whose decoder direction has a counterpart in the column config with "
        f"cosine ≥ {THRESHOLDS[0]} / ≥ {THRESHOLDS[1]}. {seeds}",
        "",
        "One-to-one (Hungarian matching of decoder directions, maximising total cosine):",
        "",
        *table("one_to_one"),
        "",
        "Max-cosine (each latent's most similar direction, shared matches allowed):",
        "",
        *table("max_cosine"),
        "",
        f"![feature stability]({report_paths('.')['stability'].relative_to('.')})",
        "",
    ]


def _without_seed(cfg) -> dict:
    return {k: v for k, v in params_to_dict(cfg).items() if k != "init_seed"}


def _saelens_rows(metrics: dict[str, dict], header: str, rule: str, row) -> list[str]:
    keys = list(metrics)
    return [
        "The same evaluation under SAELens's convention (what SAELens, SAEBench and Neuronpedia publish: "
        "zero-ablation also zeroes BOS, CE leaves out the prediction made at BOS, KL includes each document's last "
        "position, MSE is summed over d_in). Use these when comparing with published SAEs; the rows above are this "
        "project's convention (BOS is never ablated).",
        "",
        header,
        rule,
        row("MSE per token (SAELens)", [metrics[k]["eval"]["reconstruction"]["mse_per_token"] for k in keys]),
        *[
            row(name, [metrics[k]["eval"]["splice"]["saelens_compatible"][field] for k in keys])
            for name, field in SAELENS_SPLICE_ROWS
        ],
        "",
    ]


def _ground_truth_rows(truth: list[dict], header: str, rule: str, row) -> list[str]:
    return [
        f"Recovery of the {fmt(truth[0]['n_features'])} true features (synthetic data; definitions below). For "
        f"scale: random directions have E|cos| = {fmt(truth[0]['random_direction_cosine'])} with a true feature.",
        "",
        header,
        rule,
        *[row(name, [t[field] for t in truth]) for name, field in GROUND_TRUTH_ROWS],
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
    for kind, path in (("train", paths["train_details"]), ("eval", paths["eval_details"])):
        if not path.is_file():
            stage = "train" if kind == "train" else "evaluate"
            raise PipelineError(f"{path} is missing; run `pipeline {stage} --config {key}` first")
        found[kind] = json.loads(path.read_text())
    return found
