"""Probes on the token labels: a planted latent is found, a random one is not, out of core as in memory, and bad
input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import invoke, labelled_store

from pipeline.artifacts import sae_outputs
from pipeline.params import load_params
from pipeline.saes import sae_class
from pipeline.saes.saelens import save_saelens
from pipeline.store import ActivationStore

HOOK, D = "planted", 64
PLANTED_LATENT = 7


def save_sae(out_dir: Path, key: str, directions: np.ndarray) -> None:
    """A JumpReLU SAE whose latent i reads and writes `directions[i]` and fires above 4 (half the planted 8)."""
    sae = sae_class("jumprelu")(D, len(directions), jumprelu_bandwidth=0.05, jumprelu_initial_threshold=4.0).eval()
    with torch.no_grad():
        sae.W_dec.copy_(torch.from_numpy(directions))
        sae.W_enc.copy_(torch.from_numpy(directions).T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    folder = out_dir / "sae" / f"config_{key}_{len(directions) // D}x"
    save_saelens(sae, folder, {"model_name": "planted", "hook_name": HOOK, "context_size": 64, "training_tokens": 1})


@pytest.fixture(scope="module")
def planted(labelled, tmp_path_factory) -> Path:
    """A planted store beside the labels, SAE `p` with the planted direction as latent 7, and SAE `r` of random
    directions orthogonal to it; the params to probe them (the number task only)."""
    root = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(1)
    direction = rng.standard_normal(D)
    direction /= np.linalg.norm(direction)
    rng_x = np.random.default_rng(0)
    store = labelled_store(root / "store", labelled, HOOK, lambda number: (
        rng_x.standard_normal((len(number), D)) + 8.0 * number[:, None] * direction))  # fmt: skip
    others = rng.standard_normal((2 * D, D))
    others -= np.outer(others @ direction, direction)  # nothing of the planted direction
    others /= np.linalg.norm(others, axis=1, keepdims=True)
    with_planted = others.copy()
    with_planted[PLANTED_LATENT] = direction
    save_sae(root / "out", "p", with_planted.astype(np.float32))
    save_sae(root / "out", "r", others.astype(np.float32))
    params = yaml.safe_load(Path(labelled["params"]).read_text())
    params["extract"] |= {"store": str(store), "hooks": [HOOK]}
    params["train"] = params["train"] | {"hook": HOOK, "out_dir": str(root / "out"), "device": "cpu"}
    params["sae"] = {key: {"expansion": 2, "batch_size": 8, "lr": 1e-3, "architecture": "jumprelu"} for key in "pr"}
    params["probe"] |= {"tasks": ["number"], "max_per_class": 150}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def probe_details(root: Path, key: str) -> dict:
    params = load_params(root / "params.yaml")
    return json.loads((sae_outputs(params.train.out_dir, key, params.sae[key])["probe"] / "probe.json").read_text())


def test_a_planted_latent_is_found_and_a_random_sae_scores_near_chance(planted):
    result = invoke("probe", "--params", str(planted / "params.yaml"))
    assert result.exit_code == 0, result.output
    (found,) = probe_details(planted, "p")["problems"]  # number: number tokens against the others
    assert (found["task"], found["class"]) == ("number", "number")
    assert found["dense"]["x"] >= 0.99 and found["dense"]["x_hat"] >= 0.99  # the SAE keeps the planted direction
    assert found["sparse"]["1"]["latents"] == [PLANTED_LATENT] and found["sparse"]["1"]["accuracy"] >= 0.99
    assert found["best_latents"][0] == {"latent": PLANTED_LATENT, "auroc": pytest.approx(1.0, abs=0.01)}
    (chance,) = probe_details(planted, "r")["problems"]
    assert chance["dense"]["x"] == found["dense"]["x"]  # the same probe of the same activations
    assert chance["dense"]["x_hat"] < 0.65 and chance["sparse"]["1"]["accuracy"] < 0.65
    assert chance["best_latents"][0]["auroc"] < 0.65
    latents = json.loads((sae_outputs(planted / "out", "p", load_params(planted / "params.yaml").sae["p"])["probe"]
                          / "latents.json").read_text())  # fmt: skip
    assert latents["labels"] == ["number=number"] and latents["auroc"][PLANTED_LATENT] >= 0.99


def test_probing_out_of_core_gives_the_resident_results(planted, tmp_path):
    """The split read a chunk at a time (train.memory_budget_gb below the split's size) gives the same probes."""
    params = planted / "params.yaml"
    assert invoke("probe", "--params", str(params), "-c", "p").exit_code == 0
    resident = probe_details(planted, "p")
    result = invoke("probe", "--params", str(params), "-c", "p", "-S", "train.memory_budget_gb=0.0004")
    assert result.exit_code == 0, result.output
    streamed = probe_details(planted, "p")
    assert ActivationStore(load_params(params).extract.store).activations("test", HOOK).nbytes > 0.0004 * 2**30
    assert streamed["problems"] == resident["problems"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["probe.tasks=[regions]"], "unknown label task 'regions' in probe.tasks; the labels have: region, step"),
        (["probe.min_positives=5000", "probe.max_per_class=5000"],
         "no class of number has 5000 tokens in each half of split 'test'"),
        (["probe.split=validation"], "holds no labels for split 'validation'; run `pipeline label`"),
        (["probe.max_per_class=5"], "invalid probe.max_per_class: 5 (allowed: >= probe.min_positives)"),
    ],
)  # fmt: skip
def test_bad_probe_input_is_one_line(planted, overrides, message):
    result = invoke("probe", "--params", str(planted / "params.yaml"), *[w for o in overrides for w in ("-S", o)])
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_labels_of_other_tokens_are_refused(labelled, tmp_path):
    """The store re-extracted from fewer documents: its tokens are not the labels' any more."""
    params = labelled["params"]
    moved = ["-S", f"extract.store={tmp_path / 'fewer'}", "-S", "data.max_docs=10"]
    assert invoke("extract", "--params", str(params), *moved).exit_code == 0
    result = invoke("probe", "--params", str(params), *moved)
    assert result.exit_code == 2 and "labels other tokens than the store's 'test' split" in result.stderr


def probe_result(task: str, x_hat: float) -> dict:
    """One problem of probe.json, as the report reads it."""
    return {"task": task, "dense": {"x": 1.0, "x_hat": x_hat},
            "sparse": {str(k): {"accuracy": x_hat - 0.1} for k in (1, 5, 20)}}  # fmt: skip


def evaluated(explained_variance: float, l0: float) -> dict:
    """A config's train and eval details, as much as the report's guided section reads."""
    reconstruction = {"explained_variance": explained_variance, "mse": 1 - explained_variance, "l0": l0,
                      "dead_latents": 3}  # fmt: skip
    return {"eval": {"reconstruction": reconstruction, "splice": None}}


def test_the_report_puts_a_guided_config_beside_its_unguided_twin():
    from pipeline.params import GuideConfig, Params, SAEConfig
    from pipeline.report.render import _guided_section

    base = {"expansion": 8, "batch_size": 4, "lr": 1e-3, "architecture": "topk", "k": 4}
    params = Params(sae={"t": SAEConfig(**base), "g": SAEConfig(**base, guide=GuideConfig(task="role", coeff=0.5)),
                         "other": SAEConfig(**base | {"k": 8})})  # fmt: skip
    probes = {"t": {"problems": [probe_result("role", 0.6), probe_result("role", 0.8), probe_result("region", 0.1)]},
              "g": {"problems": [probe_result("role", 0.9), probe_result("role", 0.9)]}, "other": None}  # fmt: skip
    metrics = {"t": evaluated(0.9, 4.0), "g": evaluated(0.85, 4.0), "other": evaluated(0.95, 8.0)}
    lines = _guided_section(params, metrics, probes, {k: f"config_{k}" for k in params.sae}, "")
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in lines if line.startswith("| ")}
    headers = [line for line in lines if line.startswith("| | ")]
    assert headers == ["| | config_g (guided by role) | config_t | difference |"]  # its twin; `other`'s k differs
    assert rows["probe accuracy on x̂ (role)"] == ["0.9000", "0.7000", "0.2000 |"]  # role's classes, not region
    assert rows["explained variance"] == ["0.8500", "0.9000", "-0.0500 |"]
    assert rows["CE loss score"] == ["n/a", "n/a", "n/a |"]
