"""The report's Markdown text: every number in it comes from the metrics files (details), the store's attributes
and the stability file; nothing is computed here but formatting."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.artifacts import report_paths, sae_outputs
from pipeline.params import SETTINGS_BEFORE, Params, params_to_dict
from pipeline.report import published
from pipeline.report.rules import recommend
from pipeline.report.stability import THRESHOLDS
from pipeline.saes import sae_class


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


SAELENS_SPLICE_ROWS = (
    ("CE clean (SAELens)", "ce_clean"), ("CE with SAE (SAELens)", "ce_sae"),
    ("CE zero-ablated (SAELens)", "ce_zero"), ("CE loss score (SAELens)", "ce_loss_score"),
    ("KL with SAE (SAELens)", "kl_sae"), ("KL zero-ablated (SAELens)", "kl_zero"), ("KL score (SAELens)", "kl_score"),
)  # fmt: skip


def render(
    params: Params, metrics: dict[str, dict], store_attrs: dict, labels: dict[str, str], shares: dict | None = None,
    probes: dict[str, dict | None] | None = None,
) -> str:  # fmt: skip
    """The Markdown text of the report (`probes`: each config's probe.json, None where it was not probed)."""
    any_train, any_eval = next(iter(metrics.values()))["train"], next(iter(metrics.values()))["eval"]
    stats = store_attrs.get("split_stats", {})
    groups: dict[str, dict[str, dict]] = {}  # hook -> the metrics of the configs at it
    for key, m in metrics.items():  # a transcoder's group is its input -> target
        groups.setdefault(" -> ".join(filter(None, (m["train"]["hook"], m["train"].get("target_hook")))), {})[key] = m
    hooks = "hook" + "s" * (len(groups) > 1) + " " + ", ".join(f"`{hook}`" for hook in groups)
    lines = [
        "# SAE training report",
        "",
        f"Model `{store_attrs['model']}`, {hooks} (d_in = {fmt(any_train['d_in'])}), "
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
            f"| {s}{' (generated while training)' * bool(v.get('streamed'))} | {fmt(v['n_docs'])} | "
            f"{fmt(v['n_tokens'])} | {fmt(v.get('n_truncated_docs', 0))} |"
            for s, v in stats.items()
        ],
        "",
        f"Hardware: {any_train['hardware']} (device `{any_train['device']}`), mixed precision: {any_train['amp']}.",
        "",
    ]
    for key, m in metrics.items():
        lines += _config_section(params, key, labels[key], m, show_hook=len(groups) > 1)
    # Configs are compared, and one recommended, among those at one hook: other hooks are other questions.
    at = {hook: "" if len(groups) == 1 else f" at `{hook}`" for hook in groups}
    for hook, group in groups.items():
        lines += _comparison(params, group, labels, at[hook])
        if published.applies(store_attrs.get("synthetic")) and all(m["eval"]["ground_truth"] for m in group.values()):
            lines += published.comparison_lines(group, fmt)
        lines += _probing_section({key: (probes or {}).get(key) for key in group}, labels, at[hook])
        lines += _guided_section(params, group, probes or {}, labels, at[hook])
    lines += _stability_section(params, labels, shares or {})
    for hook, group in groups.items():
        lines += _across_tasks_section(params, list(group), labels, shares or {}, probes or {}, at[hook])
    lines += _warnings(metrics, labels)
    for hook, group in groups.items():
        lines += _recommendation(group, labels, at[hook])
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
        "that E‖x‖² = d_in; MSE is per element, L1 is the sum over latents of activation × decoder row norm per "
        "token (relu_decoder_norm free: the norms are learned; unit, and every other architecture: rows are kept at "
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


def _recommendation(metrics: dict[str, dict], labels: dict[str, str], at: str) -> list[str]:
    choice, rule = recommend(metrics)
    lines = [f"## Recommendation{at}", "", rule if choice is None else f"Rule: {rule}", ""]
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
    return lines


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
        "and matryoshka, and by the sparsity coefficient for relu and jumprelu (set in the params, or adapted toward "
        "`target_l0` and then frozen): compare rows at their measured L0.",
    ]


def curves_table(tsv_files: list[Path]) -> str:
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


def _config_section(params: Params, key: str, label: str, m: dict, show_hook: bool) -> list[str]:
    train, rec, splice = m["train"], m["eval"]["reconstruction"], m["eval"]["splice"] or {}
    cfg = train["config"]  # as trained: per-config settings resolved against the train section
    hyper = [
        *([("hook", f"`{train['hook']}`")] if show_hook else []),
        *([("transcoder", f"`{train['hook']}` → `{train['target_hook']}`")] if "target_hook" in train else []),
        *([("skip path", "W_skip x, learned")] if cfg.get("skip") else []),
        ("architecture", cfg["architecture"]),
        *[(name, _setting(cfg.get(name, SETTINGS_BEFORE.get(name))))
          for name in sae_class(cfg["architecture"]).settings],
        ("expansion", f"{train['d_sae'] / train['d_in']:.3g}x"), ("d_sae", fmt(train["d_sae"])),
        ("parameters", fmt(train["n_params"])),
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
    if isinstance(value, str):
        return value
    return ", ".join(fmt(v) for v in value) if isinstance(value, list) else fmt(value)


GROUND_TRUTH_ROWS = (
    ("MCC", "mcc"), ("F1", "f1"), ("precision", "precision"), ("recall", "recall"), ("uniqueness", "uniqueness"),
    ("latents that fired", "n_alive_latents"), ("true L0", "true_l0"), ("samples", "n_samples"),
)  # fmt: skip


def _comparison(params: Params, metrics: dict[str, dict], labels: dict[str, str], at: str) -> list[str]:
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
        f"## Comparative analysis{at}",
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


def _probing_section(probes: dict[str, dict | None], labels: dict[str, str], at: str) -> list[str]:
    """Per label task, the probes' accuracy on x, x_hat and k latents (means over the task's classes)."""
    found = {key: p for key, p in probes.items() if p and p.get("problems")}
    if not found:
        why = next((p["skipped"] for p in probes.values() if p and "skipped" in p), "run `pipeline probe`")
        return [f"## What the latents know about the reasoning{at}", "", f"Not probed: {why}.", ""]
    first = next(iter(found.values()))
    tasks = list(dict.fromkeys(p["task"] for p in first["problems"]))
    keys = list(found)

    def mean(details: dict, task: str, value) -> float:
        return float(np.mean([value(p) for p in details["problems"] if p["task"] == task]))

    def cell(key: str, task: str) -> str:
        parts = [f"x̂ {fmt(mean(found[key], task, lambda p: p['dense']['x_hat']))}"]
        parts += [f"k={k} {fmt(mean(found[key], task, lambda p, k=k: p['sparse'][str(k)]['accuracy']))}"
                  for k in (1, 5, 20) if str(k) in first["problems"][0]["sparse"]]  # fmt: skip
        return " · ".join(parts)

    rows = [
        f"| {task} ({sum(p['task'] == task for p in first['problems'])}) | "
        f"{fmt(mean(first, task, lambda p: p['dense']['x']))} | " + " | ".join(cell(k, task) for k in keys) + " |"
        for task in tasks
    ]
    strong = {key: sum(p["best_latents"][0]["auroc"] >= 0.9 for p in found[key]["problems"]) for key in keys}
    unprobed: dict[str, int] = {}
    for skipped in first["skipped"]:
        unprobed[skipped["task"]] = unprobed.get(skipped["task"], 0) + 1
    return [
        f"## What the latents know about the reasoning{at}",
        "",
        f"Token labels from the solutions' structure (docs/probing.md) on split `{first['split']}`: probes fit on "
        f"{fmt(first['documents']['fit'])} documents and scored on the other {fmt(first['documents']['score'])}, "
        "each class one-vs-rest on a balanced sample (chance 0.5). `x`: a logistic regression on the activations; "
        "`x̂`: the same probe on the SAE's reconstruction; `k=`: SAEBench's sparse probe on the k latents whose "
        "means differ most. Rows: label task (classes probed), accuracies averaged over its classes.",
        "",
        "| task | x | " + " | ".join(labels[k] for k in keys) + " |",
        "| --- | --- |" + " --- |" * len(keys),
        *rows,
        "",
        "Classes with a single latent at AUROC ≥ 0.9: "
        + ", ".join(f"{labels[k]} {strong[k]} of {len(found[k]['problems'])}" for k in keys)
        + ".",
        *(
            [f"Label tasks this corpus does not have: {', '.join(first['absent_tasks'])}."]
            if first["absent_tasks"]
            else []
        ),
        *(
            [
                "Classes not probed, too few of their tokens or of the others in a half (probe.json says which): "
                + ", ".join(f"{task} {n}" for task, n in unprobed.items())
                + "."
            ]
            if unprobed
            else []
        ),
        "",
    ]


def _guided_section(params: Params, metrics: dict[str, dict], probes: dict[str, dict | None], labels: dict[str, str],
                    at: str) -> list[str]:  # fmt: skip
    """Each probe-guided config beside its unguided twin (the config at the hook that differs only by the guide):
    what the guidance bought on its task's probes, and what it cost."""
    pairs = [(key, twin) for key in metrics if params.sae[key].guide for twin in metrics
             if _unguided(params.sae[twin]) == _unguided(params.sae[key]) and not params.sae[twin].guide]  # fmt: skip
    if not pairs:
        return []
    lines = [
        f"## Probe-guided training{at}",
        "",
        "Each guided config beside the config that differs from it only by `guide` (docs/training.md). Probe "
        "figures are the means over the guide's task's classes (the probing table's); the rest as above.",
        "",
    ]
    probe_rows = [
        ("probe accuracy on x̂", lambda p: p["dense"]["x_hat"]),
        *((f"sparse probe, k={k}", lambda p, k=k: p["sparse"][str(k)]["accuracy"]) for k in (1, 5, 20)),
    ]
    eval_rows = [("explained variance", "reconstruction", "explained_variance"), ("MSE", "reconstruction", "mse"),
                 ("L0", "reconstruction", "l0"), ("dead latents", "reconstruction", "dead_latents"),
                 ("CE loss score", "splice", "ce_loss_score")]  # fmt: skip
    for key, twin in pairs:
        guide = params.sae[key].guide
        rows = [("guide coefficient", guide.coeff, 0.0)]
        for name, value in probe_rows:
            found = [_task_mean(probes.get(k), guide.task, value) for k in (key, twin)]
            if None not in found:
                rows.append((f"{name} ({guide.task})", *found))
        rows += [(name, *[(metrics[k]["eval"][group] or {}).get(field) for k in (key, twin)])
                 for name, group, field in eval_rows]  # fmt: skip
        header = f"| | {labels[key]} (guided by {guide.task}) | {labels[twin]} | difference |"
        lines += [header, "| --- | --- | --- | --- |",
                  *[f"| {name} | {fmt(a)} | {fmt(b)} | {fmt(None if a is None or b is None else a - b)} |"
                    for name, a, b in rows], ""]  # fmt: skip
    return lines


def _unguided(cfg) -> dict:
    return {k: v for k, v in params_to_dict(cfg).items() if k != "guide"}


def _task_mean(details: dict | None, task: str, value) -> float | None:
    found = [value(p) for p in (details or {}).get("problems") or [] if p["task"] == task]
    return float(np.mean(found)) if found else None


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
            if y not in shares[x]:
                return "other hook"
            return " / ".join(fmt(shares[x][y][method][str(t)]) for t in THRESHOLDS)

        return [header, rule, *[f"| {labels[x]} | " + " | ".join(cell(x, y) for y in keys) + " |" for x in keys]]

    reseeded = [
        f"{labels[x]} and {labels[y]}" for i, x in enumerate(keys) for y in keys[i + 1 :]
        if _without_seed(params.sae[x]) == _without_seed(params.sae[y]) and y in shares[x]
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
    return _settings(cfg, "init_seed")


def _settings(cfg, *left_out: str) -> dict:
    """A config's settings but `left_out`: two configs equal on them differ only there."""
    return {k: v for k, v in params_to_dict(cfg).items() if k not in left_out}


def _across_tasks_section(params: Params, keys: list[str], labels: dict[str, str], shares: dict,
                          probes: dict[str, dict | None], at: str) -> list[str]:  # fmt: skip
    """Configs trained on different reasoning tasks (`documents`), matched against each other, beside the same
    config trained on the same task with another seed; and each SAE's latents across `probe.across`'s tasks."""
    tasks = {key: params.sae[key].documents for key in keys}
    pairs = [(x, y) for i, x in enumerate(keys) for y in keys[i + 1 :]]
    same = {key: _settings(params.sae[key], "documents", "init_seed") for key in keys}
    across = [(x, y) for x, y in pairs if tasks[x] != tasks[y] and same[x] == same[y]]
    seeded = [(x, y) for x, y in pairs if tasks[x] is not None and tasks[x] == tasks[y] and same[x] == same[y]]
    latent_rows = [(key, p["across_tasks"]) for key in keys if (p := probes.get(key)) and "across_tasks" in p]
    if not across and not latent_rows:
        return []

    def task(key: str) -> str:
        return "every document" if tasks[key] is None else tasks[key].describe()

    def shared(x: str, y: str) -> str:
        found = shares.get(x, {}).get(y)
        return "n/a" if found is None else " / ".join(fmt(found["one_to_one"][str(t)]) for t in THRESHOLDS)

    def seeds(x: str, y: str) -> str:
        a, b = (params.sae[k].init_seed for k in (x, y))
        named = [params.train.seed if s is None else s for s in (a, b)]
        return f"{named[0]} and {named[1]}" + (" (the same initial weights)" if named[0] == named[1] else "")

    lines = [f"## Feature stability across reasoning tasks{at}", ""]
    if across:
        lines += [
            "Share of the first config's latents with a counterpart in the second (one-to-one matching of decoder "
            f"directions, cosine ≥ {THRESHOLDS[0]} / ≥ {THRESHOLDS[1]}): configs that differ in the documents they "
            "train on (and perhaps their seed), then the seed-to-seed baseline (the same task, another seed). Two "
            "SAEs of one width and seed start from the same weights, and their share then counts that common start "
            "too: compare tasks with seeds of their own.",
            "",
            "| configs | trained on | seeds | shared |",
            "| --- | --- | --- | --- |",
            *[f"| {labels[x]} → {labels[y]} | {task(x)} → {task(y)} | {seeds(x, y)} | {shared(x, y)} |"
              for x, y in across],
            *[f"| {labels[x]} → {labels[y]} (seed baseline) | {task(x)} | {seeds(x, y)} | {shared(x, y)} |"
              for x, y in seeded],
            *([] if seeded else ["", "No pair of configs differs only in its seed on one task: add one for the "
                                     "baseline."]),
            "",
        ]  # fmt: skip
    if latent_rows:
        names = list(latent_rows[0][1]["latents"])
        lines += [
            "Each SAE's latents on the held-out split's documents of two tasks (`probe.across`, docs/probing.md): "
            "rare (on less than 0.1% of either task's tokens), specific to one task (on the other at less than a "
            "tenth of that), or shared, with the same best token label on both tasks or another. Documents: "
            + ", ".join(f"{name} {count}" for name, count in latent_rows[0][1]["documents"].items()) + ".",
            "",
            "| config | " + " | ".join(names) + " |",
            "| --- |" + " --- |" * len(names),
            *[f"| {labels[key]} | " + " | ".join(fmt(found["latents"][n]) for n in names) + " |"
              for key, found in latent_rows],
            "",
        ]  # fmt: skip
    return lines


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
