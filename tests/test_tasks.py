"""Reasoning tasks: documents chosen by their solutions' structure, configs trained on them alone, and one SAE's
latents compared across two tasks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import invoke

from pipeline.artifacts import sae_outputs
from pipeline.label.documents import selected
from pipeline.label.label_set import LabelSet
from pipeline.params import DocumentsConfig, load_params
from pipeline.probe.across import classify

ADDITIVE, MULTIPLYING = {"operations": ["+", "-"]}, {"any_operation": ["*"]}


def test_documents_are_chosen_by_their_operations_and_steps():
    counts = {  # + ; - ; * ; + then * ; no solution ; + - in three steps
        "n_steps": np.array([1, 1, 1, 2, 0, 3]),
        "operations": np.array([0b0001, 0b0010, 0b0100, 0b0101, 0, 0b0011]),
    }  # fmt: skip
    assert selected(counts, DocumentsConfig(**ADDITIVE)).tolist() == [True, True, False, False, False, True]
    assert selected(counts, DocumentsConfig(**MULTIPLYING)).tolist() == [False, False, True, True, False, False]
    assert selected(counts, DocumentsConfig(min_steps=2, max_steps=3)).tolist() == [0, 0, 0, 1, 0, 1]
    assert selected(counts, DocumentsConfig()).all()  # every document, solution or not


@pytest.fixture(scope="module")
def tasks(labelled, tmp_path_factory) -> Path:
    """Params for configs on the labelled tiny extraction: C on all documents, on the additive ones (two seeds)
    and on those with a multiplication."""
    root = tmp_path_factory.mktemp("tasks")
    params = yaml.safe_load(Path(labelled["params"]).read_text())
    base = {"expansion": 4, "batch_size": 8, "lr": 3e-3, "epochs": 2}
    params["sae"] = {"c": base, "c_add": base | {"documents": ADDITIVE},
                     "c_add2": base | {"documents": ADDITIVE, "init_seed": 1},
                     "c_mul": base | {"documents": MULTIPLYING}}  # fmt: skip
    params["train"] |= {"hook": "blocks.1.hook_resid_post", "seq_len": 8, "out_dir": str(root / "out"),
                        "device": "cpu"}  # fmt: skip
    params["probe"] |= {"across": [ADDITIVE, MULTIPLYING], "min_positives": 5}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("train", "probe", "stability"):
        result = invoke(stage, "--params", str(root / "params.yaml"))
        assert result.exit_code == 0, result.output
    return root


def test_a_config_trains_on_its_task_s_documents_only(tasks, labelled):
    params = load_params(tasks / "params.yaml")
    counts = LabelSet(params.probe.labels).documents("train")
    offsets = labelled["store"].doc_offsets("train")
    for key, chosen in (("c_add", DocumentsConfig(**ADDITIVE)), ("c_mul", DocumentsConfig(**MULTIPLYING))):
        details = json.loads((tasks / f"out/details/train_{key}.json").read_text())
        mask = selected(counts, chosen)
        assert 0 < mask.sum() < len(mask)  # the generated rows hold both kinds
        assert details["n_training_tokens_per_epoch"] == int((np.diff(offsets)[mask] - 1).sum())  # BOS left out
    everything = json.loads((tasks / "out/details/train_c.json").read_text())
    assert everything["n_training_tokens_per_epoch"] == int(offsets[-1]) - (len(offsets) - 1)


def test_latents_are_compared_across_the_two_tasks(tasks):
    params = load_params(tasks / "params.yaml")
    folder = sae_outputs(params.train.out_dir, "c", params.sae["c"])["probe"]
    found = json.loads((folder / "probe.json").read_text())["across_tasks"]
    names = ["operations within {+, -}", "some *"]
    assert list(found["documents"]) == names and all(n > 0 for n in found["documents"].values())
    assert sum(found["latents"].values()) == params.sae["c"].width(64)  # every latent in one class
    per_task = json.loads((folder / "latents.json").read_text())["tasks"]
    assert found["latents"] == classify(per_task[names[0]], per_task[names[1]], *names)
    shares = json.loads((tasks / "out/details/stability.json").read_text())["shares"]
    assert set(shares["c_add"]) == {"c", "c_add2", "c_mul"}  # the cross-task and seed pairs the report shows


def test_latents_are_classified_by_where_they_fire():
    a = {"frequency": [0.2, 0.2, 0.3, 0.0, 0.0005, 0.002],
         "best_label": ["role=result", "role=result", "x", None, None, "z"]}  # fmt: skip
    b = {"frequency": [0.1, 0.15, 0.01, 0.4, 0.0, 0.0005],
         "best_label": ["role=result", "region=question", "x", "y", None, "z"]}  # fmt: skip
    # the last fires on A's tokens only at 0.2%, and on B's at a quarter of that: shared, not specific
    assert classify(a, b, "A", "B") == {"shared, same best label": 2, "shared, another best label": 1, "only A": 1,
                                        "only B": 1, "rare": 1}  # fmt: skip


def test_a_task_without_documents_is_one_line(tasks):
    result = invoke("train", "--params", str(tasks / "params.yaml"), "-c", "c_mul", "-S",
                    "sae.c_mul.documents={min_steps: 7}")  # fmt: skip
    assert result.exit_code == 2 and "sae.c_mul.documents (7 steps or more): no document of split 'train'" in \
        result.stderr  # fmt: skip
    assert len(result.stderr.strip().splitlines()) == 1
