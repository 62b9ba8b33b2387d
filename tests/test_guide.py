"""Probe-guided training: a guided SAE keeps a weak labelled direction that a plain one drops; coeff 0 is no
guide at all; a guided run resumes bit for bit; a task without labelled tokens is one line."""

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

HOOK, D = "weak", 16
RELU = {"d_sae": 8, "batch_size": 16, "lr": 1e-2, "epochs": 12, "l1_coeff": 0.1, "decorrelation_coeff": 0.0}


@pytest.fixture(scope="module")
def weak(labelled, tmp_path_factory) -> Path:
    """Tokens that are all a strong direction s of random size 2-4, plus a weak direction u (0.5) on number
    tokens, plus a little noise: reconstructing u saves less than its L1 costs, so a plain ReLU SAE drops it."""
    root = tmp_path_factory.mktemp("weak")
    rng = np.random.default_rng(0)
    s, u = np.linalg.qr(rng.standard_normal((D, 2)))[0].T  # orthonormal
    np.save(root / "u.npy", u)
    store = labelled_store(root / "store", labelled, HOOK, lambda number: (
        rng.uniform(2, 4, (len(number), 1)) * s + 0.5 * number[:, None] * u
        + 0.05 * rng.standard_normal((len(number), D))))  # fmt: skip
    params = yaml.safe_load(Path(labelled["params"]).read_text())
    params["extract"] |= {"store": str(store), "hooks": [HOOK]}
    params["train"] |= {"hook": HOOK, "out_dir": str(root / "out"), "device": "cpu", "seq_len": 8,
                        "checkpoint_every": 4}  # fmt: skip
    params["sae"] = {"plain": RELU, "guided": RELU | {"guide": {"task": "number", "coeff": 1.0}},
                     "off": RELU | {"guide": {"task": "number", "coeff": 0.0}}}  # fmt: skip
    params["probe"] |= {"tasks": ["number"], "max_per_class": 400}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def weights(root: Path, out: str, key: str) -> dict[str, torch.Tensor]:
    params = load_params(root / "params.yaml")
    checkpoint = sae_outputs(root / out, key, params.sae[key])["checkpoint"]
    return torch.load(checkpoint, weights_only=True)["sae"]


def test_a_guided_sae_keeps_what_the_probe_reads_and_a_plain_one_does_not(weak):
    params = str(weak / "params.yaml")
    for stage in ("train", "probe"):
        result = invoke(stage, "--params", params)
        assert result.exit_code == 0, result.output
    found = {}
    for key in ("plain", "guided"):
        folder = sae_outputs(weak / "out", key, load_params(params).sae[key])["probe"]
        (problem,) = json.loads((folder / "probe.json").read_text())["problems"]  # number tokens against the rest
        found[key] = problem["dense"]
    assert found["plain"]["x"] == found["guided"]["x"] >= 0.99  # the ceiling: the probe on the activations
    assert found["guided"]["x_hat"] >= found["guided"]["x"] - 0.02  # the guided SAE keeps the weak direction
    assert found["plain"]["x_hat"] <= found["plain"]["x"] - 0.2  # the plain one loses it
    details = json.loads((weak / "out/details/train_guided.json").read_text())
    assert details["guide_probe"] == {"task": "number", "classes": ["other", "number"]}
    assert "guide" in details["final_step"]


@pytest.mark.parametrize("budget_gb", [1.0, 0.0002])  # resident; streamed in windows of one chunk
def test_labels_travel_with_their_activations(weak, budget_gb):
    """Each row of a block ends with its own token's label: here the weak direction's size says which it is."""
    from pipeline.label.label_set import LabelSet
    from pipeline.store import ActivationStore
    from pipeline.train.loader import ActivationLoader

    params = load_params(weak / "params.yaml")
    labels = LabelSet(params.probe.labels).tokens("train")["number"]
    loader = ActivationLoader(ActivationStore(params.extract.store), "train", HOOK, torch.device("cpu"), seed=0,
                              memory_budget_gb=budget_gb, columns=labels[:, None])  # fmt: skip
    assert loader.resident_on_device == (budget_gb == 1.0)
    u = torch.from_numpy(np.load(weak / "u.npy")).float()
    rows = torch.cat(list(loader.epoch(1, 512)))
    assert len(rows) == loader.n_tokens and rows.shape[1] == D + 1
    weak_part = rows[:, :D] @ u  # 0.5 on number tokens, 0 elsewhere (noise 0.05)
    assert torch.all(((weak_part > 0.25) == (rows[:, D] == 1)) | (rows[:, D] == -1))
    assert (rows[:, D] == 1).sum() == (labels == 1).sum()  # every number token once (BOS tokens are unlabelled)


def test_data_parallel_guided_training_matches_one_process(weak, tmp_path):
    from conftest import pipeline_command

    pipeline_command("train", "--params", str(weak / "params.yaml"), "-c", "guided", "-S", "train.nproc=2",
                     "-S", f"train.out_dir={tmp_path / 'out'}", cwd=tmp_path)  # fmt: skip
    two, one = weights(weak, str(tmp_path / "out"), "guided"), weights(weak, "out", "guided")
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_a_zero_coefficient_is_no_guide_at_all(weak):
    """coeff 0 trains bit for bit as the config without a guide (no labels read, no term computed)."""
    plain, off = weights(weak, "out", "plain"), weights(weak, "out", "off")
    assert all(torch.equal(value, off[name]) for name, value in plain.items())


@pytest.mark.parametrize("budget_gb", [0.0002])  # streamed in windows of one chunk (resident: as any run resumes)
def test_a_guided_run_resumes_bit_for_bit(weak, tmp_path, monkeypatch, budget_gb):
    from pipeline.train.trainer import Trainer

    def params(out: str) -> list[str]:
        return ["--params", str(weak / "params.yaml"), "-c", "guided", "-S", f"train.out_dir={tmp_path / out}",
                "-S", f"train.memory_budget_gb={budget_gb}"]  # fmt: skip

    uninterrupted = invoke("train", *params("reference"))
    assert uninterrupted.exit_code == 0 and ("streamed" in uninterrupted.stderr) == (budget_gb < 1)
    original, seen = Trainer._train_on_block, {"blocks": 0}

    def killed_midway(self, run, epoch, block_index, block, bar):
        seen["blocks"] += 1
        if seen["blocks"] == 30:  # two blocks after the checkpoint at block 28
            raise KeyboardInterrupt
        return original(self, run, epoch, block_index, block, bar)

    monkeypatch.setattr(Trainer, "_train_on_block", killed_midway)
    assert invoke("train", *params("resumed")).exit_code == 130
    monkeypatch.undo()
    assert invoke("train", *params("resumed"), "--resume").exit_code == 0
    resumed, reference = (weights(weak, str(tmp_path / out), "guided") for out in ("resumed", "reference"))
    assert all(torch.equal(value, reference[name]) for name, value in resumed.items())


def test_an_unknown_guide_task_is_one_line(weak):
    result = invoke("train", "--params", str(weak / "params.yaml"), "-c", "guided", "-S",
                    "sae.guided.guide.task=reasons")  # fmt: skip
    assert result.exit_code == 2 and "unknown label task 'reasons' in sae.guided.guide.task" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("labels", "why"), [([-1, -1, -1], "no"), ([2, -1, 2], "one class of")])
def test_a_guide_needs_two_classes_in_the_training_split(labels, why):
    from types import SimpleNamespace

    from pipeline.core.errors import PipelineError
    from pipeline.probe.guide import fit_guide_probe

    with pytest.raises(PipelineError, match=f"label task 'step' has {why} labelled tokens in split 'train'"):
        fit_guide_probe(SimpleNamespace(split="train"), np.array(labels), "step", ["1", "2", "3"], 10, 0)
