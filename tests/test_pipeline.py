"""The whole pipeline: `pipeline run`, `dvc repro` on the tiny profile, evaluation and report consistency."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import torch
import yaml
from conftest import PROJECT_ROOT, invoke, saebench_accepted
from safetensors.torch import load_file

from pipeline.artifacts import sae_outputs
from pipeline.evaluate.splice import splice_scores
from pipeline.model import load_model
from pipeline.params import ModelConfig, load_params
from pipeline.report.render import fmt, fmt_gb, fmt_rate, fmt_seconds
from pipeline.report.rules import recommend
from pipeline.store import ActivationStore
from pipeline.tiny import write_tiny_assets

TINY_RUN_TRAIN_STEPS = 150


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """`pipeline run` on params-tiny.yaml in a scratch directory (paths there are relative, as under DVC), on the
    tiny model trained briefly (the quick start trains it longer)."""
    root = tmp_path_factory.mktemp("tiny-run")
    write_tiny_assets(root / "data" / "tiny", train_steps=TINY_RUN_TRAIN_STEPS)
    shutil.copy(PROJECT_ROOT / "params-tiny.yaml", root / "params.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        result = invoke("run")
    assert result.exit_code == 0, result.output
    return root


def table_rows(markdown: str) -> dict[str, list[str]]:
    """Every Markdown table row, keyed by its first cell (later rows of the same name overwrite earlier)."""
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("| ---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_report_numbers_are_the_metrics_files_numbers(tiny_run):
    params = load_params(tiny_run / "params.yaml")
    report = (tiny_run / "artifacts/report.md").read_text()
    metrics = {}
    for key, cfg in params.sae.items():
        paths = sae_outputs(tiny_run / "artifacts", key, cfg)
        metrics[key] = {
            "train": json.loads(paths["train_details"].read_text()),
            "eval": json.loads(paths["eval_details"].read_text()),
        }
    rows = table_rows(report)
    keys = list(params.sae)
    for name, group, field in [
        ("explained variance", "reconstruction", "explained_variance"),
        ("L0", "reconstruction", "l0"),
        ("dead latents", "reconstruction", "dead_latents"),
        ("CE loss score", "splice", "ce_loss_score"),
        ("KL score", "splice", "kl_score"),
    ]:
        assert rows[name] == [fmt(metrics[k]["eval"][group][field]) for k in keys], name
    for name, field in (("CE loss score (SAELens)", "ce_loss_score"), ("KL score (SAELens)", "kl_score")):
        assert rows[name] == [fmt(metrics[k]["eval"]["splice"]["saelens_compatible"][field]) for k in keys]
    assert rows["MSE per token (SAELens)"] == [fmt(metrics[k]["eval"]["reconstruction"]["mse_per_token"]) for k in keys]
    assert rows["tokens/s"] == [fmt_rate(metrics[k]["train"]["tokens_per_s"]) for k in keys]
    assert rows["peak memory (GB)"] == [fmt_gb(metrics[k]["train"]["peak_memory_bytes"]) for k in keys]
    assert rows["train time (s)"] == [fmt_seconds(metrics[k]["train"]["train_time_s"]) for k in keys]
    for e in range(3):
        assert rows[f"epoch {e + 1}"] == [fmt(metrics[k]["train"]["loss_per_epoch"][e]) for k in keys]
    for m in metrics.values():  # the figures agree with each other
        train = m["train"]
        assert train["tokens_per_s"] * train["train_time_s"] == pytest.approx(train["tokens_seen"])
        assert train["tokens_seen"] == train["steps"] * train["batch_tokens"]
        rec = m["eval"]["reconstruction"]
        assert rec["mse_per_token"] == pytest.approx(rec["mse"] * train["d_in"])  # SAELens sums over d_in
        splice = m["eval"]["splice"]
        gap = splice["ce_zero"] - splice["ce_clean"]
        if gap > max(0.1, 3 * splice["ce_ablation_effect_standard_error"]):
            score = (splice["ce_zero"] - splice["ce_sae"]) / gap
            assert splice["ce_loss_score"] == pytest.approx(score)
        else:
            raise AssertionError(f"zero-ablation should hurt the trained tiny model: CE gap {gap}")
        assert splice["kl_score"] is not None
    stats = ActivationStore(tiny_run / "data/activations").attrs["split_stats"]
    assert rows["train"][:2] == [fmt(stats["train"]["n_docs"]), fmt(stats["train"]["n_tokens"])]
    choice, rule = recommend(metrics)
    assert (f"**config_{choice}_" in report) if choice else (rule in report)
    for key, m in metrics.items():  # every flag raised by evaluation is in the report
        for flag in m["eval"]["flags"]:
            assert f"- config_{key}_{params.sae[key].expansion}x: {flag}" in report
    assert "```\npipeline run\n```" in report  # the command that produced it
    for figure in ("training_curves", "l0_vs_explained_variance", "feature_density"):
        png = tiny_run / "artifacts/report" / f"{figure}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(report/{figure}.png)" in report


def entry(ce_score, l0, kl_score=0.5, dead=0, dense=0, d_sae=100):
    return {"eval": {"splice": {"ce_loss_score": ce_score, "kl_score": kl_score},
                     "reconstruction": {"l0": l0, "explained_variance": 0.9, "dead_latents": dead,
                                        "dense_latents": dense, "d_sae": d_sae}}}  # fmt: skip


def test_saebench_core_output_is_valid_and_holds_our_saelens_convention_values(tiny_run):
    params = load_params(tiny_run / "params.yaml")
    for key, cfg in params.sae.items():
        paths = sae_outputs(tiny_run / "artifacts", key, cfg)
        written = saebench_accepted(paths["saebench_core"])
        details = json.loads(paths["eval_details"].read_text())
        rec, saelens = details["reconstruction"], details["splice"]["saelens_compatible"]
        metrics = written["eval_result_metrics"]
        assert metrics["model_performance_preservation"] == {
            "ce_loss_score": saelens["ce_loss_score"], "ce_loss_with_ablation": saelens["ce_zero"],
            "ce_loss_with_sae": saelens["ce_sae"], "ce_loss_without_sae": saelens["ce_clean"],
        }  # fmt: skip
        assert metrics["model_behavior_preservation"] == {
            "kl_div_score": saelens["kl_score"], "kl_div_with_ablation": saelens["kl_zero"],
            "kl_div_with_sae": saelens["kl_sae"],
        }  # fmt: skip
        quality = metrics["reconstruction_quality"]
        assert (quality["mse"], quality["explained_variance"]) == (rec["mse_per_token"], rec["explained_variance"])
        assert metrics["sparsity"] == {"l0": rec["l0"], "l1": rec["l1"]}
        latents = written["eval_result_details"]
        assert [latent["index"] for latent in latents] == list(range(rec["d_sae"]))
        density = np.array([latent["feature_density"] for latent in latents])
        # Two passes over the split in different orders: the densities of one sum to the L0 of the other.
        assert density.sum() == pytest.approx(rec["l0"], rel=1e-9)
        assert (density == 0).sum() == rec["dead_latents"]
        assert metrics["misc_metrics"]["frac_alive"] == pytest.approx(1 - rec["dead_latents"] / rec["d_sae"])
        assert written["sae_cfg_dict"] == json.loads((paths["saelens"] / "cfg.json").read_text())  # relu: standard
        tokens = json.loads(paths["train_details"].read_text())["tokens_seen"]
        assert written["sae_cfg_dict"]["training_tokens"] == tokens


def test_probes_are_in_saebench_s_layout_and_in_the_report(tiny_run):
    saebench = pytest.importorskip("sae_bench.evals.sparse_probing.eval_output", reason="pip install sae-bench")
    import jsonschema
    from pydantic import TypeAdapter

    schema = json.loads((Path(saebench.__file__).parent / "eval_output_schema_sparse_probing.json").read_text())
    params = load_params(tiny_run / "params.yaml")
    report = table_rows((tiny_run / "artifacts/report.md").read_text())
    for key, cfg in params.sae.items():
        folder = sae_outputs(tiny_run / "artifacts", key, cfg)["probe"]
        details = json.loads((folder / "probe.json").read_text())
        written = json.loads((folder / "sparse_probing_eval_results.json").read_text())
        jsonschema.validate(written, schema)
        TypeAdapter(saebench.SparseProbingEvalOutput).validate_python(written)
        tasks = {p["task"] for p in details["problems"]}
        assert {row["dataset_name"] for row in written["eval_result_details"]} == {f"gsm8k/{t}" for t in tasks}
        for row in written["eval_result_details"]:  # a dataset's accuracy: the mean over its classes
            problems = [p for p in details["problems"] if f"gsm8k/{p['task']}" == row["dataset_name"]]
            for k in (1, 5, 20):
                mean = np.mean([p["sparse"][str(k)]["accuracy"] for p in problems])
                assert row[f"sae_top_{k}_test_accuracy"] == pytest.approx(mean)
            assert row["llm_test_accuracy"] == pytest.approx(np.mean([p["dense"]["x"] for p in problems]))
            task = row["dataset_name"].split("/")[1]
            cell = report[f"{task} ({len(problems)})"][1 + list(params.sae).index(key)]
            assert cell.startswith(f"x̂ {fmt(np.mean([p['dense']['x_hat'] for p in problems]))} · ")
        latents = json.loads((folder / "latents.json").read_text())
        assert len(latents["auroc"]) == cfg.width(64)  # the tiny model's d_model: 64
        assert latents["labels"] == [f"{p['task']}={p['class']}" for p in details["problems"]]


def test_the_report_names_relu_s_decoder_norms_and_reads_older_details_as_unit(tiny_run, tmp_path):
    assert table_rows((tiny_run / "artifacts/report.md").read_text())["relu_decoder_norm"] == ["free"]
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    for details in (copy / "artifacts/details").glob("train_*.json"):  # as written before the setting existed
        record = json.loads(details.read_text())
        del record["config"]["relu_decoder_norm"]
        details.write_text(json.dumps(record))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(copy)
        assert invoke("report").exit_code == 0
    assert table_rows((copy / "artifacts/report.md").read_text())["relu_decoder_norm"] == ["unit"]


def test_the_report_compares_reasoning_tasks_beside_the_seed_baseline(tiny_run):
    """params-tiny.yaml: C on the additive documents (two seeds) and on those with a multiplication."""
    report = (tiny_run / "artifacts/report.md").read_text()
    section = report[report.index("## Feature stability across reasoning tasks") :]
    section = section[: section.index("\n## ", 3)]
    rows = table_rows(section)
    shares = json.loads((tiny_run / "artifacts/details/stability.json").read_text())["shares"]

    def shown(x: str, y: str) -> str:
        return " / ".join(fmt(shares[x][y]["one_to_one"][t]) for t in ("0.9", "0.7"))

    assert rows["config_c_add_8x → config_c_mul_8x"] == ["operations within {+, -} → some *", "2 and 4",
                                                         shown("c_add", "c_mul")]  # fmt: skip
    baseline = rows["config_c_add_8x → config_c_add2_8x (seed baseline)"]
    assert baseline == ["operations within {+, -}", "2 and 3", shown("c_add", "c_add2")]
    assert rows["config_c_8x → config_c_add_8x"][1] == "0 and 2"  # C on every document: a task too
    params = load_params(tiny_run / "params.yaml")
    for key, cfg in params.sae.items():  # every SAE's latents across the two tasks, each in one class
        counts = [int(v.replace(",", "")) for v in rows[f"config_{key}_{cfg.width_label}"]]
        assert sum(counts) == cfg.width(64)


# SAE-Dashboard's NeuronpediaDashboardFeature.to_dict and NeuronpediaDashboardActivation.to_dict
# (sae_dashboard/neuronpedia/neuronpedia_dashboard.py) and NeuronpediaDashboardBatch.to_dict: every field, in order.
NEURONPEDIA_FEATURE_FIELDS = [
    "feature_index", "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
    "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson", "correlated_features_indices",
    "correlated_features_l1", "correlated_features_pearson", "neg_str", "neg_values", "pos_str", "pos_values",
    "frac_nonzero", "freq_hist_data_bar_values", "freq_hist_data_bar_heights", "logits_hist_data_bar_heights",
    "logits_hist_data_bar_values", "n_prompts_total", "n_tokens_in_prompt", "dataset", "decoder_weights_dist",
    "activations", "vector",
]  # fmt: skip
NEURONPEDIA_ACTIVATION_FIELDS = ["bin_min", "bin_max", "bin_contains", "tokens", "values", "qualifying_token_index"]
NEURONPEDIA_BATCH_FIELDS = ["model_id", "layer", "sae_set", "sae_id_suffix", "features"]


def test_neuronpedia_export_has_the_reference_layout_and_our_top_activations(tiny_run, monkeypatch):
    from pipeline.analyze.browser import read_browser_data

    monkeypatch.chdir(tiny_run)
    result = invoke("export", "--format", "neuronpedia", "--config", "c")
    assert result.exit_code == 0, result.output
    params = load_params(tiny_run / "params.yaml")
    browser = read_browser_data(sae_outputs("artifacts", "c", params.sae["c"])["browser"])
    folder = tiny_run / "artifacts/export/neuronpedia/config_c_8x"
    batches = [json.loads(path.read_text()) for path in sorted(folder.glob("batch-*.json"))]
    skipped_file = json.loads((folder / "skipped_indexes.json").read_text())
    skipped = skipped_file.pop("skipped_indexes")  # SAE-Dashboard's runner writes the layer there as a string
    assert skipped_file == {"model_id": "model", "layer": "2", "sae_set": "config_c_8x"}
    features = {f["feature_index"]: f for batch in batches for f in batch["features"]}
    assert all(list(batch) == NEURONPEDIA_BATCH_FIELDS and batch["layer"] == 2 for batch in batches)
    decoder = load_file(sae_outputs("artifacts", "c", params.sae["c"])["saelens"] / "sae_weights.safetensors")["W_dec"]
    assert sorted([*features, *skipped]) == list(range(browser["d_sae"]))  # every latent: exported, or never fired
    for ours in browser["features"]:
        if ours["id"] in skipped:
            assert ours["frequency"] == 0
            continue
        exported = features[ours["id"]]
        assert list(exported) == NEURONPEDIA_FEATURE_FIELDS
        assert all(list(a) == NEURONPEDIA_ACTIVATION_FIELDS for a in exported["activations"])
        top = [a for a in exported["activations"] if a["bin_min"] == -1]
        assert len(top) == len(ours["top"])
        for example, (_doc, _pos, centre, ids, acts) in zip(top, ours["top"], strict=True):
            assert example["tokens"] == [browser["vocab"][str(t)] for t in ids]
            assert example["qualifying_token_index"] == centre
            assert example["values"] == pytest.approx([a * ours["max"] / 1000 for a in acts], abs=1e-5)
        row = decoder[ours["id"]]  # SAE-Dashboard's alignment: the three largest signed weights, abs(w) / L1
        largest = row.topk(3)
        assert exported["neuron_alignment_indices"] == largest.indices.tolist()
        assert exported["neuron_alignment_values"] == pytest.approx(largest.values.tolist(), abs=1e-5)
        assert exported["neuron_alignment_l1"] == pytest.approx((largest.values.abs() / row.abs().sum()).tolist(),
                                                                abs=1e-5)  # fmt: skip
        assert exported["pos_values"] == [v for _, v in ours["logits"]["top"]]
        assert exported["frac_nonzero"] == ours["frequency"]
        intervals = [a["bin_contains"] for a in exported["activations"] if a["bin_min"] != -1]
        assert sum(q["count"] for q in ours["quantiles"]) == sum(ours["histogram"])  # every firing token, once
        assert all(0 <= share <= 1 for share in intervals)


@pytest.mark.parametrize(
    ("model_name", "model_id"),
    [("openai-community/gpt2", "gpt2-small"), ("gpt2", "gpt2-small"), ("EleutherAI/pythia-70m-deduped",
     "pythia-70m-deduped"), ("google/gemma-2-2b", "gemma-2-2b"), ("data/tiny/model", "model")],
)  # fmt: skip
def test_the_neuronpedia_model_id_is_transformer_lens_s_alias(model_name, model_id):
    from pipeline.export.neuronpedia import neuronpedia_model_id

    assert neuronpedia_model_id(model_name) == model_id


# Layer 0's MLP: the one the trained tiny model needs. Zero-ablating it raises the held-out CE by 1.44 nats;
# zero-ablating layer 1's, 2's or 3's by 0.021, 0.006 and 0.006 (40 test documents), within the splice's noise
# rule, so a CE loss score there is undefined by design.
MLP_IN, MLP_OUT = "blocks.0.mlp.hook_in", "blocks.0.hook_mlp_out"


def test_a_transcoder_replaces_the_tiny_model_s_mlp(tiny_run, monkeypatch):
    """An MLP of the trained tiny model, replaced by a transcoder trained beside an ordinary SAE at its output:
    spliced in, the model keeps most of what zero-ablating the MLP costs (CE loss score)."""
    from pipeline.analyze.browser import read_browser_data
    from pipeline.api import load_model as api_model
    from pipeline.api import load_sae, run_with_transcoder

    monkeypatch.chdir(tiny_run)
    base = yaml.safe_load((tiny_run / "params.yaml").read_text())
    transcoder = {"hook": MLP_IN, "target_hook": MLP_OUT, "expansion": 8, "batch_size": 32, "lr": 3e-3, "epochs": 8}
    ordinary = {"hook": MLP_OUT, "expansion": 4, "batch_size": 64, "lr": 3e-3, "epochs": 8}

    def params_file(name: str, sae: dict) -> str:
        params = base | {"sae": sae}
        params["extract"] = base["extract"] | {"hooks": [MLP_IN, MLP_OUT], "store": "data/mlp"}
        params["train"] = base["train"] | {"out_dir": f"artifacts-{name}"}
        Path(f"{name}.yaml").write_text(yaml.safe_dump(params))
        return f"{name}.yaml"

    both = params_file("mlp", {"t": transcoder, "s": ordinary})
    result = invoke("run", "--params", both)
    assert result.exit_code == 0, result.output
    alone = params_file("mlp-alone", {"t": transcoder})
    assert invoke("train", "--params", alone).exit_code == 0
    weights = [torch.load(f"artifacts-{name}/sae/config_t_8x_final.pt", weights_only=True)["sae"]
               for name in ("mlp", "mlp-alone")]  # fmt: skip
    assert all(torch.equal(value, weights[1][key]) for key, value in weights[0].items())  # trained with others

    metrics = json.loads(Path("artifacts-mlp/metrics/eval_t.json").read_text())
    details = json.loads(Path("artifacts-mlp/details/eval_t.json").read_text())
    assert details["target_hook"] == MLP_OUT and metrics["ce_loss_score"] >= 0.9, metrics
    browser = read_browser_data("artifacts-mlp/browser/config_t_8x")
    assert browser["target_hook"] == MLP_OUT and len(browser["features"]) == 8 * 64
    report = Path("artifacts-mlp/report.md").read_text()
    assert f"`{MLP_IN}` → `{MLP_OUT}`" in report and f"Comparative analysis at `{MLP_IN} -> {MLP_OUT}`" in report

    sae, cfg = load_sae("artifacts-mlp/sae/config_t_8x")  # SAELens's transcoder layout, read back
    assert cfg["architecture"] == "transcoder" and (cfg["hook_name"], cfg["hook_name_out"]) == (MLP_IN, MLP_OUT)
    model = api_model(base["model"]["name"], device="cpu")
    store = ActivationStore("data/mlp")
    tokens = torch.from_numpy(store.tokens("test")[: store.doc_offsets("test")[1]].astype(np.int64))[None]
    spliced = run_with_transcoder(model, sae, tokens, MLP_IN, MLP_OUT)
    with torch.inference_mode():  # the same by hand: the MLP's output, but BOS's, is the prediction from its input
        _, cache = model.run_with_cache(tokens, names_filter=[MLP_IN])
        predicted = sae(cache[MLP_IN])[0]

        def patch(activation, hook):
            return torch.cat([activation[:, :1], predicted[:, 1:]], dim=1)

        expected = model.run_with_hooks(tokens, fwd_hooks=[(MLP_OUT, patch)], return_type="logits")
    torch.testing.assert_close(spliced, expected)


def test_recommendation_follows_the_stated_rule():
    assert recommend({"a": entry(0.80, 10), "b": entry(0.95, 50), "c": entry(0.90, 5)})[0] == "b"
    assert recommend({"a": entry(0.80, 10), "b": entry(0.95, 50), "c": entry(0.945, 5)})[0] == "c"
    # Where the CE score is not usable for any config (undefined, or outside [0, 1]), the KL score decides.
    for unusable in (None, 1.4):
        choice, rule = recommend({"a": entry(unusable, 10, 0.7), "b": entry(0.95, 50, 0.5), "c": entry(0.90, 5, 0.6)})
        assert choice == "a" and "Used here: KL score" in rule
    # A config whose latents are all dense (or all dead) is not a sparse dictionary: never recommended.
    choice, rule = recommend({"a": entry(0.99, 10, dense=100), "b": entry(0.5, 50), "c": entry(0.4, 5, dead=100)})
    assert choice == "b" and "(here: a, c)" in rule
    choice, rule = recommend({"a": entry(0.99, 10, dense=100)})
    assert choice is None and rule.startswith("No recommendation")


def test_a_score_is_undefined_when_the_ablation_effect_is_within_noise():
    from pipeline.evaluate.splice import _Totals

    def scores(ce_gap: float, gap_sd: float, n: int = 1000) -> dict:
        # n tokens whose ablation raises the CE by ce_gap on average, with standard deviation gap_sd
        totals = _Totals(["s"])
        totals.sums = {"ce_clean": 2.0 * n, "ce_zero": (2.0 + ce_gap) * n, "kl_zero": 1.0 * n,
                       "ce_gap_sq": (ce_gap**2 + gap_sd**2) * n, "kl_zero_sq": 1.0 * n}  # fmt: skip
        totals.n_ce = totals.n_kl = n
        totals.per_sae["s"] = {"ce_sae": (2.0 + ce_gap / 4) * n, "kl_sae": 0.25 * n}
        return totals.scores("s", n_docs=10)

    assert scores(1.0, 0.1)["ce_loss_score"] == pytest.approx(0.75)  # (CE_zero - CE_sae) / (CE_zero - CE_clean)
    assert scores(1.0, 0.1)["kl_score"] == pytest.approx(0.75)
    assert scores(0.004, 0.001)["ce_loss_score"] is None  # below 0.1 nats: what a random model gives
    noisy = scores(0.2, 10.0)  # above 0.1 nats, but the standard error is 10 / sqrt(999) = 0.32
    assert noisy["ce_loss_score"] is None and noisy["ce_ablation_effect_standard_error"] == pytest.approx(0.316, 1e-2)
    assert any("below the 0.1 nats" in flag for flag in noisy["flags"])


class LookupModel(torch.nn.Module):
    """A 'model' whose hooked activation is a lookup of the token and whose logits are that activation."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def run_with_hooks(self, ids, attention_mask, fwd_hooks, return_type):
        activation = self.table[ids]
        for _, hook in fwd_hooks:
            activation = hook(activation, hook=None)
        return activation


def test_both_splice_conventions_on_a_hand_computable_case():
    """Documents [BOS, 1, 2] and [BOS, 3]; the 'SAE' halves the activation, so every value has a closed form."""
    table = torch.tensor([[0.0, 2.0, 0.0, 1.0], [0.0, 0.0, 3.0, 0.0], [1.0, 0.0, 0.0, 2.0], [2.0, 1.0, 0.0, 0.0]])
    tokens, offsets = np.array([0, 1, 2, 0, 3]), np.array([0, 3, 5])
    scores = splice_scores(LookupModel(table), tokens, offsets, "hook", {"half": lambda x: 0.5 * x}, 64)["half"]

    def log_p(logits):
        return torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), -1)

    uniform = log_p(torch.zeros(4))

    def ce(rows):  # rows: (logits at the predicting position, target)
        return float(np.mean([-log_p(logits)[target] for logits, target in rows]))

    def kl(rows):  # rows: (clean logits, other logits)
        return float(np.mean([(log_p(c).exp() * (log_p(c) - log_p(o))).sum() for c, o in rows]))

    t = table.double()
    # Ours: BOS never replaced; CE and KL over the predictions at positions 0..L-2 (BOS's included).
    ours_ce = {"clean": [(t[0], 1), (t[1], 2), (t[0], 3)], "sae": [(t[0], 1), (0.5 * t[1], 2), (t[0], 3)],
               "zero": [(t[0], 1), (uniform, 2), (t[0], 3)]}  # fmt: skip
    assert scores["ce_clean"] == pytest.approx(ce(ours_ce["clean"]))
    assert scores["ce_sae"] == pytest.approx(ce(ours_ce["sae"]))
    assert scores["ce_zero"] == pytest.approx(ce(ours_ce["zero"]))
    assert scores["kl_sae"] == pytest.approx(kl([(t[0], t[0]), (t[1], 0.5 * t[1]), (t[0], t[0])]))
    assert scores["kl_zero"] == pytest.approx(kl([(t[0], t[0]), (t[1], uniform), (t[0], t[0])]))
    assert (scores["n_ce_tokens"], scores["n_kl_tokens"]) == (3, 3)
    # SAELens: zero-ablation zeroes BOS too; CE over the predictions at positions 1..L-2, KL over 1..L-1.
    saelens = scores["saelens_compatible"]
    assert saelens["ce_clean"] == pytest.approx(ce([(t[1], 2)]))
    assert saelens["ce_sae"] == pytest.approx(ce([(0.5 * t[1], 2)]))
    assert saelens["ce_zero"] == pytest.approx(ce([(uniform, 2)]))
    assert saelens["kl_sae"] == pytest.approx(kl([(t[1], 0.5 * t[1]), (t[2], 0.5 * t[2]), (t[3], 0.5 * t[3])]))
    assert saelens["kl_zero"] == pytest.approx(kl([(t[1], uniform), (t[2], uniform), (t[3], uniform)]))
    assert (saelens["n_ce_tokens"], saelens["n_kl_tokens"]) == (1, 3)


def test_splice_scores_are_one_for_identity_and_zero_for_zeros(tiny_params, tiny_run):
    trained_tiny_model_dir = tiny_run / "data/tiny/model"
    assert invoke("extract", "--params", str(tiny_params), "-S", f"model.name={trained_tiny_model_dir}").exit_code == 0
    store = ActivationStore(load_params(tiny_params).extract.store)
    model = load_model(ModelConfig(name=str(trained_tiny_model_dir), device="cpu"))
    offsets = store.doc_offsets("test")[:21]
    scores = splice_scores(
        model,
        store.tokens("test"),
        offsets,
        "blocks.1.hook_resid_post",
        {"identity": lambda x: x, "zero": torch.zeros_like, "noisy": lambda x: x + 0.5 * torch.randn_like(x)},
        batch_tokens=1024,
    )
    assert scores["identity"]["ce_zero"] > scores["identity"]["ce_clean"] + 0.1  # ablation hurts this model
    assert scores["identity"]["ce_loss_score"] == pytest.approx(1.0)
    assert scores["identity"]["kl_score"] == pytest.approx(1.0)
    assert scores["identity"]["kl_sae"] == pytest.approx(0.0, abs=1e-6)
    assert scores["zero"]["ce_loss_score"] == pytest.approx(0.0)
    assert scores["zero"]["kl_score"] == pytest.approx(0.0)
    assert 0 < scores["noisy"]["kl_sae"] < scores["noisy"]["kl_zero"]
    n_tokens = int(np.diff(offsets).sum())
    assert scores["identity"]["n_ce_tokens"] == n_tokens - 20  # every document's last token predicts nothing
    saelens = scores["identity"]["saelens_compatible"]
    assert (saelens["n_ce_tokens"], saelens["n_kl_tokens"]) == (n_tokens - 40, n_tokens - 20)  # and BOS neither
    assert saelens["ce_loss_score"] == pytest.approx(1.0) and saelens["kl_score"] == pytest.approx(1.0)


def copy_of(tiny_run: Path, destination: Path, with_artifacts: bool) -> Path:
    ignore = None if with_artifacts else shutil.ignore_patterns("artifacts")
    shutil.copytree(tiny_run, destination, ignore=ignore)
    return destination


def test_the_tiny_profile_checkpoints_so_an_interrupted_run_resumes(tiny_run, tmp_path, monkeypatch):
    from pipeline.train.trainer import Trainer

    monkeypatch.chdir(copy_of(tiny_run, tmp_path / "copy", with_artifacts=False))
    original = Trainer._train_on_block
    blocks = {"n": 0}

    def interrupted(self, run, epoch, block_index, block, bar):
        blocks["n"] += 1
        if blocks["n"] == 8:  # params-tiny.yaml checkpoints every 5 blocks
            raise KeyboardInterrupt
        return original(self, run, epoch, block_index, block, bar)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_train_on_block", interrupted)
        assert invoke("train", "--config", "a").exit_code == 130
    result = invoke("train", "--config", "a", "--resume")
    assert result.exit_code == 0 and "resumed config_a_4x" in result.output


def test_evaluate_refuses_a_model_whose_shape_changed_under_the_same_name(tiny_run, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from pipeline.tiny import save_tiny_gpt2

    root = copy_of(tiny_run, tmp_path / "copy", with_artifacts=True)
    monkeypatch.chdir(root)
    tokenizer = AutoTokenizer.from_pretrained(root / "data/tiny/model")
    shutil.rmtree(root / "data/tiny/model")
    save_tiny_gpt2(root / "data/tiny/model", tokenizer, n_embd=32)
    result = invoke("evaluate", "--config", "a")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "now has {'d_model': 32, 'n_ctx': 256}" in result.stderr and "{'d_model': 64" in result.stderr


def test_evaluate_errors_name_what_is_missing(tiny_run):
    params = str(tiny_run / "params.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tiny_run)
        result = invoke("evaluate", "--params", params, "--config", "z")
        assert result.exit_code == 2 and "unknown SAE config 'z'" in result.stderr
        result = invoke("evaluate", "--params", params, "-S", "train.out_dir=elsewhere")
        assert result.exit_code == 2 and "no trained SAE for sae.a at elsewhere/sae/config_a_4x" in result.stderr
        result = invoke("evaluate", "--params", params, "-S", "train.hook=blocks.2.hook_resid_pre")
        assert result.exit_code == 2 and "was trained on blocks.2.hook_resid_post" in result.stderr
        result = invoke("evaluate", "--params", params, "-S", "evaluate.split=validation")
        assert result.exit_code == 2 and "split 'validation' is not in store" in result.stderr
        result = invoke("report", "--params", params, "-S", "train.out_dir=elsewhere")
        assert result.exit_code == 2 and "is missing; run `pipeline train --config a` first" in result.stderr
        fewer = yaml.safe_load((tiny_run / "params.yaml").read_text())
        fewer["sae"] = {key: fewer["sae"][key] for key in ("a", "b")}
        (tiny_run / "fewer.yaml").write_text(yaml.safe_dump(fewer))
        result = invoke("report", "--params", str(tiny_run / "fewer.yaml"))
        compared = "compares configs a, b, c, c2, c_add, c_add2, c_mul, not this params file's (a, b)"
        assert result.exit_code == 2 and compared in result.stderr


def dvc(repo: Path, *args: str) -> str:
    done = subprocess.run(["dvc", *args], cwd=repo, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def dvc_json(repo: Path, *args: str):
    done = subprocess.run(["dvc", *args, "--json"], cwd=repo, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
needs_dvc = pytest.mark.skipif(shutil.which("dvc") is None or shutil.which("git") is None, reason="needs dvc and git")


def dvc_repo(repo: Path, edit_dvc_yaml: Callable[[str], str] = lambda text: text) -> Path:
    """A git repository at `repo` holding this checkout's files (dvc.yaml passed through `edit_dvc_yaml`) and the
    tiny profile as params.yaml: two configs (foreach over several), one epoch each, on two reasoning tasks
    (`documents`), whose latents the probes compare across the tasks. DVC's plumbing is under test, not the SAEs."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    for name in files:
        if (PROJECT_ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT_ROOT / name, repo / name)
    (repo / "dvc.yaml").write_text(edit_dvc_yaml((repo / "dvc.yaml").read_text()))
    params = yaml.safe_load((repo / "params-tiny.yaml").read_text())
    params["sae"] = {key: params["sae"][key] | {"epochs": 1} for key in ("c_add", "c_mul")}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    write_tiny_assets(repo / "data" / "tiny")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([*GIT, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*GIT, "commit", "-qm", "init"], cwd=repo, check=True)
    return repo


@needs_dvc
def test_dvc_repro_on_the_tiny_profile(tmp_path):
    repo = dvc_repo(tmp_path / "repo")
    first = stages_run(dvc(repo, "repro"))
    keys = ("c_add", "c_mul")
    per_config = {f"{stage}@{key}" for stage in ("train", "evaluate", "probe", "analyze") for key in keys}
    assert first == {"extract", "label", *per_config, "stability", "report"}
    report = (repo / "artifacts/report.md").read_text()
    assert "## Feature stability across reasoning tasks" in report and "config_c_add_8x → config_c_mul_8x" in report
    for key in keys:  # the model is untrained: its splice scores are undefined, which SAEBench reads as -1
        written = saebench_accepted(sae_outputs(repo / "artifacts", key, load_params(repo / "params.yaml").sae[key])
                                    ["saebench_core"])  # fmt: skip
        assert written["eval_result_metrics"]["model_performance_preservation"]["ce_loss_score"] == -1
        assert "undefined" in written["eval_result_unstructured"]["undefined_scores"]["ce_loss_score"]
    assert (repo / "artifacts/browser/config_c_mul_8x/index.html").is_file()
    assert stages_run(dvc(repo, "repro")) == set()
    subprocess.run([*GIT, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*GIT, "commit", "-qm", "baseline"], cwd=repo, check=True)

    # An experiment reruns only what its change touches, and keeps its own metrics beside the baseline's.
    changed = stages_run(dvc(repo, "exp", "run", "-S", "+sae.c_mul.documents.min_steps=2"))  # another task
    assert changed == {"train@c_mul", "evaluate@c_mul", "probe@c_mul", "analyze@c_mul", "stability", "report"}
    assert (
        json.loads((repo / "artifacts/details/train_c_mul.json").read_text())["documents"] == "some *, 2 steps or more"
    )
    shown = dvc_json(repo, "exp", "show")
    (baseline,) = [commit for commit in shown if commit.get("experiments")]
    (experiment,) = [rev for exp in baseline["experiments"] for rev in exp["revs"]]
    eval_c = [rev["data"]["metrics"]["artifacts/metrics/eval_c_mul.json"]["data"] for rev in (baseline, experiment)]
    assert all("explained_variance" in m and "l0" in m for m in eval_c)
    assert eval_c[0]["explained_variance"] != eval_c[1]["explained_variance"]

    # Metrics are a few numbers; plots compare every config in one figure per quantity, plus the report's PNGs.
    metrics = dvc_json(repo, "metrics", "show")
    (workspace,) = metrics.values()  # the workspace's metrics (DVC names that revision "" or "workspace")
    values = [v for f in workspace["data"].values() for v in f["data"].values()]
    assert all(isinstance(v, int | float) for v in values) and len(values) <= 30
    plots = dvc_json(repo, "plots", "show")["data"]
    for name in ("training loss", "training MSE", "training L1", "training L0"):
        points = plots[name][0]["content"]["data"]["values"]
        assert {p["config"] for p in points} == set(keys), name
    assert any(name.endswith("training_curves.png") for name in plots)

    assert stages_run(dvc(repo, "repro", "--force", "--single-item", "train@c_add")) == {"train@c_add"}


CACHED_STORE = "    outs:\n      - ${extract.store}\n"  # the extract stage's output in dvc.yaml
UNCACHED_STORE = "    outs:\n      - ${extract.store}:\n          cache: false\n"  # docs/dvc.md's way out


@needs_dvc
def test_the_store_as_an_uncached_dvc_output_still_invalidates(tmp_path):
    """docs/dvc.md: `cache: false` on the extract stage's output keeps DVC from copying the store into its cache,
    and `dvc repro` still reruns what a change of the store's parameters touches."""
    assert UNCACHED_STORE.removeprefix("    outs:\n") in (PROJECT_ROOT / "docs/dvc.md").read_text()
    repo = dvc_repo(tmp_path / "repo", lambda text: text.replace(CACHED_STORE, UNCACHED_STORE, 1))
    assert UNCACHED_STORE in (repo / "dvc.yaml").read_text()
    assert stages_run(dvc(repo, "repro", "label")) == {"extract", "label"}
    store = repo / load_params(repo / "params.yaml").extract.store
    files = [f for f in store.rglob("*") if f.is_file()]
    (recorded,) = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["extract"]["outs"]
    assert recorded["md5"].endswith(".dir") and recorded["size"] == sum(f.stat().st_size for f in files)  # hashed
    cached = {f.parent.name + f.name for f in (repo / ".dvc/cache").rglob("*") if f.is_file()}
    assert cached and not cached & {hashlib.md5(f.read_bytes()).hexdigest() for f in files}  # but never copied
    assert stages_run(dvc(repo, "repro", "label")) == set()
    params = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(params | {"data": params["data"] | {"max_docs": 20}}))
    assert stages_run(dvc(repo, "repro", "label")) == {"extract", "label"}  # fewer documents: a new store


def docs_python_block(page: str, heading: str) -> str:
    """The first ```python block after `heading` in docs/`page`."""
    text = (PROJECT_ROOT / "docs" / page).read_text()
    section = text[text.index(heading) :]
    return section[
        section.index("```python") + len("```python") : section.index("```\n", section.index("```python") + 9)
    ]


def test_the_documented_python_api_example_runs(tiny_run, monkeypatch, capsys):
    monkeypatch.chdir(tiny_run)
    namespace: dict = {}
    exec(docs_python_block("api.md", "# Python API"), namespace)
    assert namespace["logits"].shape[:2] == namespace["tokens"].shape
    assert namespace["f"].shape == (256, namespace["sae"].d_sae)
    assert "relative error" in capsys.readouterr().out


def test_run_with_sae_splices_the_reconstruction_at_the_hook(tiny_run):
    """An SAE that reconstructs exactly leaves the logits alone; one that outputs zeros equals zero-ablation."""
    import torch

    from pipeline.api import load_model, open_store, run_with_sae
    from pipeline.saes.relu import ReLUSAE

    store = open_store(tiny_run / "data/activations")
    model = load_model(str(tiny_run / "data/tiny/model"), device="cpu")
    hook = load_params(tiny_run / "params.yaml").train.hook
    start, end = store.doc_offsets("test")[:2]
    tokens = torch.from_numpy(store.tokens("test")[start:end]).long()[None]
    d = store.d_model
    identity = ReLUSAE(d, 2 * d).eval()  # relu(x) - relu(-x) = x
    zero = ReLUSAE(d, 2 * d).eval()
    with torch.no_grad():
        identity.W_enc.copy_(torch.cat([torch.eye(d), -torch.eye(d)], dim=1))
        identity.W_dec.copy_(torch.cat([torch.eye(d), -torch.eye(d)], dim=0))
        zero.W_dec.zero_()
    with torch.inference_mode():
        clean = model(tokens, return_type="logits")

        def zero_after_bos(activation, hook):
            activation = activation.clone()
            activation[:, 1:] = 0
            return activation

        ablated = model.run_with_hooks(tokens, fwd_hooks=[(hook, zero_after_bos)], return_type="logits")
    torch.testing.assert_close(run_with_sae(model, identity, tokens, hook), clean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(run_with_sae(model, zero, tokens, hook), ablated, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ablated, clean, atol=1e-3)  # the ablation changes something: the test can fail


def test_report_feature_stability_is_recomputed_from_the_saved_decoders(tiny_run):
    from pipeline.report.render import fmt
    from pipeline.report.stability import stability
    from pipeline.saes.saelens import load_saelens

    report = (tiny_run / "artifacts/report.md").read_text()
    section = report[report.index("## Feature stability") :]
    one_to_one = section[: section.index("Max-cosine")]
    a, _ = load_saelens(tiny_run / "artifacts/sae/config_a_4x")
    b, _ = load_saelens(tiny_run / "artifacts/sae/config_b_6x")
    shares = stability(a.W_dec.detach(), b.W_dec.detach())["x_in_y"]["one_to_one"]
    row = next(line for line in one_to_one.splitlines() if line.startswith("| config_a_4x |"))
    assert row.split(" | ")[2] == f"{fmt(shares['0.9'])} / {fmt(shares['0.7'])}"
    assert (tiny_run / "artifacts/report/feature_stability.png").stat().st_size > 0


def test_each_config_has_a_feature_browser_listing_every_latent(tiny_run):
    from pipeline.analyze.browser import read_browser_data

    params = load_params(tiny_run / "params.yaml")
    report = (tiny_run / "artifacts/report.md").read_text()
    for key, cfg in params.sae.items():
        folder = tiny_run / sae_outputs(params.train.out_dir, key, cfg)["browser"]
        data = read_browser_data(folder)
        d_sae = cfg.expansion * ActivationStore(tiny_run / params.extract.store).d_model
        assert [f["id"] for f in data["features"]] == list(range(d_sae))
        assert data["vocab"] and data["logit_note"]
        link = f"browser/{folder.name}/index.html"
        assert f"[{link}]({link})" in report


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium)")


def test_the_feature_browser_opens_in_headless_chromium(tiny_run, tmp_path):
    from pipeline.analyze.browser import read_browser_data

    browser = chromium()
    folder = tiny_run / "artifacts/browser/config_c_8x"
    data = read_browser_data(folder)
    feature = max(data["features"], key=lambda f: f["frequency"])
    url = f"{(folder / 'index.html').as_uri()}#f={feature['id']}"
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--virtual-time-budget=10000", "--dump-dom", url], capture_output=True,
                         text=True, timeout=120, check=True).stdout  # fmt: skip
    assert len(re.findall(r'<tr class="feature-row[ "]', dom)) == len(data["features"])  # the index lists every one
    panel = dom[dom.index('id="panel"') :]
    assert f"<h2>Feature {feature['id']}</h2>" in panel
    first = feature["top"][0]
    centre = data["vocab"][str(first[3][first[2]])].replace("\n", "⏎")
    assert '<span class="tok centre"' in panel and f">{html_escape(centre)}</span>" in panel
    labelled = panel[panel.index('id="best-label"') :]  # its best token label, from `pipeline probe`
    assert f"<b>{html_escape(feature['label'])}</b>" in labelled[: labelled.index("</p>")]
    label = max(data["labels"], key=lambda name: sum(f["label"] == name for f in data["features"]))
    filtered = subprocess.run([*flags, "--virtual-time-budget=10000", "--dump-dom",
                               f"{(folder / 'index.html').as_uri()}#l={quote(label)}"], capture_output=True,
                              text=True, timeout=120, check=True).stdout  # fmt: skip
    shown = re.findall(r'<tr class="feature-row[^"]*" data-feature="(\d+)"', filtered)
    assert sorted(map(int, shown)) == [f["id"] for f in data["features"] if f["label"] == label]
    shot = tmp_path / "browser.png"
    subprocess.run([*flags, "--window-size=1280,900", f"--screenshot={shot}", url], capture_output=True, timeout=120,
                   check=True)  # fmt: skip
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def html_escape(text: str) -> str:
    import html

    return html.escape(text, quote=False)


TOKEN_CLASSES = {
    "digits": lambda token: token.isdigit(),
    "arithmetic operators": lambda token: token in {"+", "-", "*", "/", "="},
    "calculator brackets": lambda token: token in {"<<", ">>"},
    "sentence ends": lambda token: token in {".", "?"},
}


def test_config_c_has_a_latent_for_one_nameable_token_class(tiny_run):
    """On the trained tiny model, some latent's top contexts all centre on one class of token."""
    from pipeline.analyze.browser import read_browser_data

    data = read_browser_data(tiny_run / "artifacts/browser/config_c_8x")
    found = {}
    for feature in data["features"]:
        centres = [data["vocab"][str(ids[at])].strip() for _, _, at, ids, _ in feature["top"]]
        for name, member in TOKEN_CLASSES.items():
            if len(centres) == 10 and sum(map(member, centres)) >= 9:
                found.setdefault(name, []).append(feature["id"])
    assert {"digits", "arithmetic operators"} <= set(found), found


def test_analyze_refuses_to_replace_a_folder_it_did_not_write(tiny_run, monkeypatch):
    browser = tiny_run / "artifacts/browser/config_a_4x"
    moved = browser.with_name("moved-aside")
    browser.rename(moved)
    try:
        browser.mkdir()
        (browser / "notes.txt").write_text("mine")
        monkeypatch.chdir(tiny_run)
        result = invoke("analyze", "--config", "a")
        assert result.exit_code == 2
        assert "did not write; refusing to replace it" in result.output
        assert (browser / "notes.txt").read_text() == "mine"
    finally:
        shutil.rmtree(browser)
        moved.rename(browser)


def test_analyze_and_evaluate_stream_a_split_larger_than_their_budget(tiny_run, tmp_path, monkeypatch):
    """With train.memory_budget_gb far below the test split, both read it out of core and give the resident
    results: the same browser data, and the same metrics up to the order of float64 sums."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("*.lock"))
    monkeypatch.chdir(run)
    details = run / "artifacts/details/eval_a.json"
    browser = run / "artifacts/browser/config_a_4x/features.js"
    resident = json.loads(details.read_text()), browser.read_bytes()
    for stage in ("analyze", "evaluate"):
        result = invoke(stage, "--config", "a", "-S", "train.memory_budget_gb=0.00001")
        assert result.exit_code == 0, result.output
        assert "streamed in windows of 1 chunk" in result.stderr
    streamed = json.loads(details.read_text())
    assert browser.read_bytes() == resident[1]
    for group in ("reconstruction", "splice"):
        for name, value in resident[0][group].items():
            if isinstance(value, float):
                assert streamed[group][name] == pytest.approx(value, rel=1e-9), name
