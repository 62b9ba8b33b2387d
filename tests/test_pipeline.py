"""The whole pipeline: `pipeline run`, `dvc repro` on the tiny profile, evaluation and report consistency."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import PROJECT_ROOT, invoke

from pipeline.config import ModelConfig, load_params, sae_outputs
from pipeline.lm import load_model
from pipeline.metrics import splice_scores
from pipeline.store import ActivationStore
from pipeline.tiny import write_tiny_assets
from stages.report import fmt, recommend


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """`pipeline run` on params-tiny.yaml in a scratch directory (paths there are relative, as under DVC)."""
    root = tmp_path_factory.mktemp("tiny-run")
    write_tiny_assets(root / "data" / "tiny")
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
            "train": json.loads(paths["train_metrics"].read_text()),
            "eval": json.loads(paths["eval_metrics"].read_text()),
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
    assert rows["tokens/s"] == [fmt(metrics[k]["train"]["tokens_per_s"]) for k in keys]
    for e in range(3):
        assert rows[f"epoch {e + 1}"] == [fmt(metrics[k]["train"]["loss_per_epoch"][e]) for k in keys]
    for m in metrics.values():  # the figures agree with each other
        train = m["train"]
        assert train["tokens_per_s"] * train["train_time_s"] == pytest.approx(train["tokens_seen"])
        assert train["tokens_seen"] == train["steps"] * train["batch_tokens"]
        splice = m["eval"]["splice"]
        if splice["ce_zero"] > splice["ce_clean"]:
            score = (splice["ce_zero"] - splice["ce_sae"]) / (splice["ce_zero"] - splice["ce_clean"])
            assert splice["ce_loss_score"] == pytest.approx(score)
        else:  # zero-ablation does not hurt this random model: the score is undefined, and says so
            assert splice["ce_loss_score"] is None and rows["CE loss score"][0] == "n/a"
    stats = ActivationStore(tiny_run / "data/activations").attrs["split_stats"]
    assert rows["train"][:2] == [fmt(stats["train"]["n_docs"]), fmt(stats["train"]["n_tokens"])]
    choice, _ = recommend(metrics)
    assert f"**config_{choice}_" in report
    for figure in ("training_curves", "l0_vs_explained_variance", "feature_density"):
        png = tiny_run / "artifacts/report" / f"{figure}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(report/{figure}.png)" in report


def test_recommendation_follows_the_stated_rule():
    def entry(score, l0):
        return {"eval": {"splice": {"ce_loss_score": score, "kl_score": 0.5}, "reconstruction": {"l0": l0}}}

    assert recommend({"a": entry(0.80, 10), "b": entry(0.95, 50), "c": entry(0.90, 5)})[0] == "b"
    assert recommend({"a": entry(0.80, 10), "b": entry(0.95, 50), "c": entry(0.945, 5)})[0] == "c"
    # Where the CE score is undefined for any config, the KL score decides, and the rule says so.
    undefined = {"a": entry(None, 10), "b": entry(0.95, 50), "c": entry(0.90, 5)}
    for key, kl in zip("abc", (0.7, 0.5, 0.6), strict=True):
        undefined[key]["eval"]["splice"]["kl_score"] = kl
    choice, rule = recommend(undefined)
    assert choice == "a" and "Used here: KL score" in rule


@pytest.fixture(scope="module")
def trained_tiny_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny GPT-2 trained briefly on GSM8K-format rows, so that ablating its residual stream hurts it."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from pipeline.tiny import make_rows

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = GPT2LMHeadModel.from_pretrained(tiny_model_dir)
    texts = [r["question"] + "\n" + r["answer"] for r in make_rows(64, seed=5)]
    ids = [torch.tensor([tokenizer.bos_token_id, *tokenizer.encode(t)])[:64] for t in texts]
    batch = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=0)
    mask = (torch.arange(batch.shape[1]) < torch.tensor([len(i) for i in ids])[:, None]).long()
    labels = batch.masked_fill(mask == 0, -100)
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        optimizer.zero_grad()
        model(input_ids=batch, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
    directory = tmp_path_factory.mktemp("trained-tiny")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_splice_scores_are_one_for_identity_and_zero_for_zeros(tiny_params, trained_tiny_model_dir):
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
    assert scores["identity"]["n_predicted_tokens"] == int(np.diff(offsets).sum() - 20)


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


def dvc(repo: Path, *args: str) -> str:
    done = subprocess.run(["dvc", *args], cwd=repo, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.mark.skipif(shutil.which("dvc") is None or shutil.which("git") is None, reason="needs dvc and git")
def test_dvc_repro_on_the_tiny_profile(tmp_path):
    repo = tmp_path / "repo"
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    for name in files:
        if (PROJECT_ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT_ROOT / name, repo / name)
    shutil.copy(repo / "params-tiny.yaml", repo / "params.yaml")
    write_tiny_assets(repo / "data" / "tiny")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=repo, check=True)

    first = stages_run(dvc(repo, "repro"))
    assert first == {"extract", "train@a", "train@b", "train@c", "evaluate@a", "evaluate@b", "evaluate@c", "report"}
    assert (repo / "artifacts/report.md").is_file()
    assert stages_run(dvc(repo, "repro")) == set()

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["sae"]["c"]["lr"] = 5e-5
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert stages_run(dvc(repo, "repro")) == {"train@c", "evaluate@c", "report"}
    assert json.loads((repo / "artifacts/metrics/train_c.json").read_text())["config"]["lr"] == 5e-5

    assert stages_run(dvc(repo, "repro", "--force", "--single-item", "train@a")) == {"train@a"}
    metrics = dvc(repo, "metrics", "show", "--json")
    assert "splice.ce_loss_score" in metrics or "ce_loss_score" in metrics
