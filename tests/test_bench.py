"""The benchmark runs on a tiny case and reports every figure (timings are never asserted: machines are shared)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import invoke, write_params

from bench.figures import GOALS

FIGURES = {
    "extract_efficiency", "bridge_overhead", "bridge_overhead_eager_attention", "extract_speedup_over_naive",
    "train_efficiency", "loader_stall",
    "one_read_ratio", "trainer_vs_minimal", "trainer_vs_minimal_small", "store_read_ratio", "streamed_read_ratio",
    "store_write_ratio",
    "decorrelation_cost",
    "topk_step_cost", "batchtopk_step_cost", "jumprelu_step_cost", "matryoshka_step_cost", "topk_selection_share",
    "analyze_vs_evaluate", "splice_efficiency", "extract_2proc_vs_1proc", "train_2proc_vs_1proc",
    "ddp_communication_share", "synth_generation_vs_step", "label_vs_tokenize", "probe_vs_evaluate",
    "guided_step_cost",
}  # fmt: skip


def test_bench_reports_every_figure(tmp_path, tiny_model_dir, gsm_dir):
    params = write_params(
        tmp_path / "params.yaml",
        model={"name": str(tiny_model_dir), "device": "cpu"},
        data={"dataset": str(gsm_dir)},
        extract={"hooks": ["blocks.1.hook_resid_post"]},
        train={"device": "cpu", "seq_len": 8},
    )
    out = tmp_path / "bench.json"
    result = invoke("bench", "--params", str(params), "--docs", "20", "--tokens", "4096", "--out", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert set(report["figures"]) == FIGURES
    assert all(math.isfinite(v) and v >= 0 for v in report["figures"].values())
    # Every figure is a ratio of two timings, but the communication share is clamped at 0 when it is within noise.
    assert all(v > 0 for name, v in report["figures"].items() if name != "ddp_communication_share")
    assert set(GOALS) <= FIGURES
    details = report["details"]
    # Each figure is the ratio of the two measurements it names.
    extract = details["extract"]
    # The anchor is plain `transformers`, outside our code: its output is the hooked activation itself.
    efficiency = extract["extract_tokens_per_s"] / extract["plain_transformers_tokens_per_s"]
    assert math.isclose(report["figures"]["extract_efficiency"], efficiency)
    overhead = extract["plain_transformers_tokens_per_s"] / extract["bridge_forward_tokens_per_s"]
    assert math.isclose(report["figures"]["bridge_overhead"], overhead)
    eager = extract["plain_transformers_tokens_per_s"] / extract["bridge_eager_attention_tokens_per_s"]
    assert math.isclose(report["figures"]["bridge_overhead_eager_attention"], eager)
    agreement = extract["plain_transformers_vs_hook"]
    assert agreement["compared"] and agreement["hook"] == "blocks.1.hook_resid_post"
    assert agreement["max_abs_diff"] <= 1e-4 * agreement["max_abs_activation"]
    step = details["train_step"]
    assert step["flops_per_step"] == 12 * step["shape"]["batch_tokens"] * step["shape"]["d_in"] * step["shape"]["d_sae"]
    assert math.isclose(report["figures"]["train_efficiency"], step["step_flops_per_s"] / step["matmul_flops_per_s"])
    assert 0 <= report["figures"]["loader_stall"] < 1
    runs = details["training_runs"]
    widest = runs["minimal_loop_config"]
    assert widest == "c" and math.isclose(
        report["figures"]["trainer_vs_minimal"], runs["minimal_loop_wall_s"] / runs["single_configs_wall_s"][widest]
    )
    arch = details["architectures"]
    assert math.isclose(report["figures"]["topk_step_cost"], arch["step_s"]["topk"] / arch["step_s"]["relu"])
    assert math.isclose(report["figures"]["guided_step_cost"], arch["step_s"]["relu_guided"] / arch["step_s"]["relu"])
    splice = details["splice"]
    assert splice["passes"] == 6 and splice["n_tokens"] > 0  # three SAEs (a, b, c): clean, two zeroed, three spliced
    synth = details["synth_generation"]  # the generator against the step that consumes its batch
    assert (synth["n_features"], synth["d_model"], synth["d_sae"]) == (16384, 768, 4096)
    assert math.isclose(report["figures"]["synth_generation_vs_step"], synth["generate_s"] / synth["step_s"])
    startup = details["startup_s"]  # each stage in a fresh process, on a small run
    assert list(startup) == ["extract", "label", "train", "evaluate", "probe", "analyze", "stability", "report"]
    assert all(seconds > 0 for seconds in startup.values()) and "start-up" in result.stderr
    analysis, labels = details["analysis"], details["labels"]
    assert math.isclose(report["figures"]["probe_vs_evaluate"], analysis["probe_s"] / analysis["evaluate_s"])
    assert math.isclose(report["figures"]["label_vs_tokenize"], labels["tokenize_s"] / labels["label_s"])
    assert labels["documents"] == 40 and labels["tokens"] > 0  # the whole test split of the rows
    write = details["store_write"]
    assert math.isclose(report["figures"]["store_write_ratio"], write["store_bytes_per_s"] / write["numpy_bytes_per_s"])
    assert write["bytes"] > 0 and write["writer_threads"] >= 1
    scaling = details["scaling"]  # two processes under torchrun against one, on the cores recorded
    assert scaling["cores"] and scaling["processes"] == 2 and scaling["extract_shards"] >= 2  # work for both
    wall, speed = scaling["extract_wall_s"], scaling["train_tokens_per_s"]
    assert math.isclose(report["figures"]["extract_2proc_vs_1proc"], wall["1"] / wall["2"])
    assert math.isclose(report["figures"]["train_2proc_vs_1proc"], speed["2"] / speed["1"])
    assert 0 <= scaling["ddp_communication_share"] < 1 and scaling["ddp_step_s"] > 0
    assert "train_efficiency" in result.stderr  # the table is printed


def test_the_saelens_comparison_runs_where_saelens_is_installed(monkeypatch, capsys):
    pytest.importorskip("sae_lens", reason="SAELens pins transformer-lens<4: it lives in an environment of its own")
    from bench import saelens_step

    monkeypatch.setattr("sys.argv", ["saelens_step", "--d-in", "16", "--expansion", "2", "--batch", "64"])
    saelens_step.main()
    report = json.loads(capsys.readouterr().out)
    assert set(report["seconds_per_step"]) == {"ours", "saelens", "minimal"}
    assert math.isclose(
        report["ours_vs_saelens"], report["seconds_per_step"]["saelens"] / report["seconds_per_step"]["ours"]
    )


def test_the_compiled_step_figure_times_each_step_both_ways():
    """Figure 8d (the device check's): through dynamo's eager backend here, which traces as inductor does but does
    not generate code (that takes longer than this suite can spend)."""
    from bench.figures import bench_compiled_step

    torch._dynamo.utils.counters.clear()
    figure = bench_compiled_step(torch.device("cpu"), "none", 16, 32, 64, 4, backend="eager")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # the compiled steps were compiled
    assert set(figure["step_s"]) == {"relu_eager", "relu_compiled", "topk_eager", "topk_compiled"}
    for name in ("relu", "topk"):
        speedup = figure["compiled_speedup"][name]
        assert speedup == figure["step_s"][f"{name}_eager"] / figure["step_s"][f"{name}_compiled"] > 0
