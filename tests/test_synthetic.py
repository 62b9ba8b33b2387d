"""The ground-truth benchmark: the generator keeps its stated distribution, and the metrics mean what they say."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
import yaml
from conftest import invoke, write_params

from pipeline.evaluate.ground_truth import abs_cosines, mcc
from pipeline.params import SynthConfig
from pipeline.synth import generator as synthetic

CPU = torch.device("cpu")
SMALL = SynthConfig(
    n_features=256, d_model=32, hierarchy_roots=4, hierarchy_branching=4, hierarchy_depth=2, correlation_scale=0.0,
    orthogonalize_steps=10, seed=3,
)  # fmt: skip
N_SAMPLES = 40_000


def draw(model: synthetic.SyntheticModel, n: int) -> torch.Tensor:
    chunks = [model.sample(4096, synthetic.sample_generator(0, "train", i, CPU))[1] for i in range(math.ceil(n / 4096))]
    return torch.cat(chunks)[:n]


@pytest.mark.parametrize("correlation_scale", [0.0, 0.1])
def test_firing_rates_and_true_l0_match_the_configuration(correlation_scale):
    cfg = SynthConfig(**{**SMALL.__dict__, "correlation_scale": correlation_scale})
    model = synthetic.build(cfg, CPU)
    a = draw(model, N_SAMPLES)
    rates = (a > 0).double().mean(dim=0)
    expected = model.expected_rates.double()
    # Binomial standard error per feature; 5 of them leave a false alarm among 256 features below 1 in 10^4.
    tolerance = 5 * (expected * (1 - expected) / N_SAMPLES).sqrt() + 1e-4
    outside = model.depths < 0
    if correlation_scale == 0:  # siblings independent: the computed rates hold for the hierarchy too
        outside = torch.ones_like(outside)
    assert ((rates - expected).abs() <= tolerance)[outside].all()
    zipf = np.arange(1, 257) ** -0.5
    target = cfg.firing_min + (cfg.firing_max - cfg.firing_min) * (zipf - zipf[-1]) / (zipf[0] - zipf[-1])
    np.testing.assert_allclose(model.expected_rates[model.depths < 0].numpy(), target[model.depths.numpy() < 0],
                               rtol=1e-5)  # fmt: skip
    l0 = (a > 0).sum(dim=1).double()
    assert abs(l0.mean() - expected.sum()) <= 4 * l0.std() / math.sqrt(N_SAMPLES)


def test_hierarchy_children_fire_only_with_their_parent_and_alone():
    model = synthetic.build(SMALL, CPU)
    active = draw(model, 8192) > 0
    children = model.parents >= 0
    assert not (active[:, children] & ~active[:, model.parents[children]]).any()
    levels = synthetic.hierarchy_levels(model.parents, model.depths)
    for above, level in itertools.pairwise(levels):
        groups = level.reshape(len(above), -1)  # [n_parents, branching]
        assert active[:, groups].sum(dim=2).max() <= 1
    assert int((model.depths >= 0).sum()) == synthetic.hierarchy_size(SMALL) == 4 + 16 + 64


def test_mcc_is_one_for_the_true_dictionary_and_near_chance_for_random_directions():
    truth = synthetic.build(SMALL, CPU).directions
    shuffled = truth[torch.randperm(len(truth))] * torch.where(torch.rand(len(truth), 1) < 0.5, -1.0, 1.0)
    assert mcc(abs_cosines(shuffled[:64], truth)) == pytest.approx(1.0, abs=1e-6)
    random = torch.randn(64, SMALL.d_model, generator=torch.Generator().manual_seed(0))
    cosines = abs_cosines(random, truth)
    chance = synthetic.cosine_baseline(SMALL.d_model)  # E|cos| of two random directions: what any matching beats
    assert cosines.mean() == pytest.approx(chance, rel=0.05)
    assert chance < mcc(cosines) <= cosines.max(dim=1).values.mean() + 1e-9  # optimal matching <= greedy rows


def test_synth_train_evaluate_report_on_a_small_store(tmp_path):
    params = write_params(
        tmp_path / "params.yaml",
        extract={"source": "synthetic", "store": str(tmp_path / "store"), "shard_tokens": 8192,
                 "chunk_tokens": 1024},
        synth={**SMALL.__dict__, "n_train": 20_000, "n_test": 2_000, "eval_samples": 4_000, "device": "cpu"},
        sae={"t": {"expansion": 2, "batch_size": 1, "lr": 1e-3, "epochs": 1, "architecture": "topk", "k": 8}},
        train={"hook": "synthetic", "seq_len": 256, "device": "cpu", "out_dir": str(tmp_path / "artifacts")},
    )  # fmt: skip
    for stage in (["synth"], ["train"], ["evaluate"], ["stability"], ["report"]):
        result = invoke(*stage, "--params", str(params))
        assert result.exit_code == 0, result.output
    details = json.loads((tmp_path / "artifacts/details/eval_t.json").read_text())
    truth = details["ground_truth"]
    assert details["splice"] is None and 0 < truth["mcc"] <= 1 and 0 < truth["f1"] <= 1
    assert truth["true_l0"] == pytest.approx(details["reconstruction"]["l0"], rel=0.5)  # k=8 vs the data's L0
    report = (tmp_path / "artifacts/report.md").read_text()
    assert "Recovery of the 256 true features" in report and "| architecture | topk |" in report
    again = invoke("synth", "--params", str(params))
    assert again.exit_code == 0 and "up to date" in again.output


def small_store_params(tmp_path, name: str, stream: bool, **train) -> str:
    """Params of a small generated store (3 train shards, the last one short) and one SAE on it, alone."""
    path = write_params(
        tmp_path / f"params-{name}.yaml",
        extract={"source": "synthetic", "store": str(tmp_path / name), "shard_tokens": 8192, "chunk_tokens": 1024},
        synth={**SMALL.__dict__, "n_train": 20_000, "n_test": 2_000, "eval_samples": 4_000, "device": "cpu",
               "stream": stream},
        train={"hook": "synthetic", "seq_len": 1000, "device": "cpu", "checkpoint_every": 3,
               "out_dir": str(tmp_path / f"artifacts-{name}"), **train},
    )  # fmt: skip
    params = yaml.safe_load(path.read_text())
    params["sae"] = {"s": {"expansion": 2, "batch_size": 1, "lr": 1e-3, "epochs": 2, "architecture": "relu"}}
    path.write_text(yaml.safe_dump(params))
    return str(path)


def test_a_streamed_train_split_is_the_stored_one(tmp_path):
    from pipeline.store import ActivationStore
    from pipeline.synth.stream import SyntheticStream

    for name, stream in (("stored", False), ("streamed", True)):
        assert invoke("synth", "--params", small_store_params(tmp_path, name, stream)).exit_code == 0
    stored, streamed = ActivationStore(tmp_path / "stored"), ActivationStore(tmp_path / "streamed")
    assert streamed.splits == ["test"] and streamed.attrs["split_stats"]["train"]["streamed"]
    test_rows = [store.activations("test", "synthetic")[:] for store in (stored, streamed)]
    np.testing.assert_array_equal(*test_rows)
    rows = torch.from_numpy(stored.activations("train", "synthetic")[:]).float()
    source = SyntheticStream(streamed, CPU, seed=0)
    for index in range(3):  # in order, bit for bit: same seeds, rounded to the store's float16
        assert torch.equal(source.shard(index), rows[index * 8192 : (index + 1) * 8192])
    epochs = [torch.cat(list(source.epoch(e, 3000))) for e in (0, 1)]
    for epoch in epochs:  # every sample once per epoch (same multiset of rows)...
        assert torch.equal(epoch[np.lexsort(epoch.T.numpy())], rows[np.lexsort(rows.T.numpy())])
    assert not torch.equal(epochs[0], epochs[1])  # ...in an order of its own
    resumed = torch.cat(list(source.epoch(1, 3000, start_block=4)))  # blocks 4.. without generating shards before
    assert torch.equal(resumed, epochs[1][4 * 3000 :])


def test_training_on_a_stream_resumes_exactly(tmp_path, monkeypatch):
    reference = small_store_params(tmp_path, "streamed", True)
    for stage in (["synth"], ["train", "-c", "s"], ["evaluate", "-c", "s"]):
        assert invoke(*stage, "--params", reference).exit_code == 0
    details = json.loads((tmp_path / "artifacts-streamed/details/train_s.json").read_text())
    assert details["n_training_tokens_per_epoch"] == 20_000 and details["loader_order"].startswith("generated")
    assert json.loads((tmp_path / "artifacts-streamed/details/eval_s.json").read_text())["ground_truth"]["mcc"] > 0
    assert invoke("stability", "--params", reference).exit_code == 0
    assert invoke("report", "--params", reference).exit_code == 0
    report = (tmp_path / "artifacts-streamed/report.md").read_text()
    assert "| train (generated while training) | 1 | 20,000 |" in report
    not_stored = invoke("evaluate", "-c", "s", "--params", reference, "-S", "evaluate.split=train")
    assert not_stored.exit_code == 2 and "synth.stream generates it while training" in not_stored.stderr

    from pipeline.train.trainer import Trainer

    original, seen = Trainer._train_on_block, []

    def killed(self, run, epoch, block_index, block, bar):
        seen.append(block_index)
        if len(seen) == 26:  # in the second epoch, after its checkpoint at block 5
            raise KeyboardInterrupt
        return original(self, run, epoch, block_index, block, bar)

    monkeypatch.setattr(Trainer, "_train_on_block", killed)
    resumed = small_store_params(tmp_path, "streamed", True, out_dir=str(tmp_path / "resumed"))
    assert invoke("train", "-c", "s", "--params", resumed).exit_code == 130
    monkeypatch.undo()
    assert invoke("train", "-c", "s", "--params", resumed, "--resume").exit_code == 0
    weights = [torch.load(tmp_path / out / "sae/config_s_2x_final.pt", weights_only=True)["sae"]
               for out in ("artifacts-streamed", "resumed")]  # fmt: skip
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key


def test_published_rows_sit_beside_ours_at_the_matching_l0():
    from pipeline.report import published
    from pipeline.report.render import fmt

    def run(architecture: str, l0: float) -> dict:
        return {"train": {"config": {"architecture": architecture}},
                "eval": {"reconstruction": {"l0": l0, "explained_variance": 0.5},
                         "ground_truth": {"f1": 0.25, "mcc": 0.75}}}  # fmt: skip

    assert published.applies({"n_features": 16384, "d_model": 768, "seed": 1})
    assert not published.applies({"n_features": 4096, "d_model": 256}) and not published.applies(None)
    lines = published.comparison_lines({"m": run("matryoshka", 24.1), "j": run("jumprelu", 20.9),
                                        "t": run("topk", 25.0), "r": run("relu", 31.0)}, fmt)  # fmt: skip
    rows = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| ") and "---" not in line}
    assert "| 25 | 0.2500 / 0.8790 | 0.7500 / 0.7930 | 0.5000 / 0.7790 |" in rows["m"]
    assert "| 20 | 0.2500 / 0.8240 | 0.7500 / 0.7430 | 0.5000 / 0.7910 |" in rows["j"]
    assert "| none | 0.2500 / n/a |" in rows["t"] and "| none |" in rows["r"]  # no published TopK; L0 31 is off


def test_the_16k_recipe_has_the_published_true_l0():
    """SynthSAEBench-16k's published data: a mean true L0 of about 34, about 25 of it within the 4,096 most
    frequent features (the SAE width's worth)."""
    model = synthetic.build(SynthConfig(orthogonalize_steps=0), CPU)  # the params defaults: the recipe
    assert (model.n_features, model.directions.shape[1]) == (16384, 768)
    assert synthetic.mean_true_l0(model) == pytest.approx(34, abs=1)
    assert float(model.expected_rates[:4096].sum()) == pytest.approx(25, abs=1)
