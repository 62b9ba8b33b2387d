"""Probes on the token labels: a planted latent is found, a random one is not, out of core as in memory, and bad
input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import invoke, write_params

from pipeline.artifacts import sae_outputs
from pipeline.label.label_set import LabelSet
from pipeline.params import load_params
from pipeline.saes import sae_class
from pipeline.saes.saelens import save_saelens
from pipeline.store import ActivationStore
from pipeline.store.writer import StoreWriter

HOOK, D = "planted", 64
PLANTED_LATENT = 7


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, tiny_model_dir, gsm_dir) -> dict:
    """The tiny model's extraction of the GSM8K-format rows, and its token labels."""
    root = tmp_path_factory.mktemp("labelled")
    params = write_params(
        root / "params.yaml",
        model={"name": str(tiny_model_dir), "device": "cpu"},
        data={"dataset": str(gsm_dir)},
        extract={"hooks": ["blocks.1.hook_resid_post"], "store": str(root / "model-store"), "shard_tokens": 2048,
                 "chunk_tokens": 512, "batch_tokens": 2048},
        probe={"labels": str(root / "labels")},
    )  # fmt: skip
    for stage in ("extract", "label"):
        result = invoke(stage, "--params", str(params))
        assert result.exit_code == 0, result.output
    return {"root": root, "params": params, "store": ActivationStore(root / "model-store")}


def planted_store(path: Path, model_store: ActivationStore, labels: LabelSet, direction: np.ndarray) -> Path:
    """The model store's tokens with synthetic activations: noise, plus 8 * `direction` on every number token."""
    rng = np.random.default_rng(0)
    attrs = {name: model_store.attrs[name] for name in ("splits", "model", "dataset", "n_ctx", "bos_token_id",
                                                         "template", "token_sha256")}  # fmt: skip
    attrs |= {"hooks": [HOOK], "d_model": D, "dtype": "float32", "shard_tokens": 1024, "chunk_tokens": 128}
    writer = StoreWriter(path, attrs, resume=False)
    for split in model_store.splits:
        tokens, offsets = model_store.tokens(split), model_store.doc_offsets(split)
        number = labels.tokens(split)["number"] == 1
        x = (rng.standard_normal((len(tokens), D)) + 8.0 * number[:, None] * direction).astype(np.float32)
        writer.add_split(split, tokens, offsets)
        for index, start, end in writer.pending_shards(split):
            writer.write_shard(split, index, start, {HOOK: x[start:end]})
    writer.finalize({})
    return path


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
    store = planted_store(root / "store", labelled["store"], LabelSet(labelled["root"] / "labels"), direction)
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
