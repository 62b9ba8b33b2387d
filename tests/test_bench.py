"""The benchmark runs on a tiny case and reports every figure (timings are never asserted: machines are shared)."""

from __future__ import annotations

import json
import math

from conftest import invoke, write_params

from pipeline.bench import GOALS

FIGURES = {
    "extract_efficiency", "bridge_overhead", "extract_speedup_over_naive", "train_efficiency", "loader_stall",
    "one_read_ratio", "store_read_ratio", "decorrelation_cost",
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
    assert all(math.isfinite(v) and v > 0 for v in report["figures"].values())
    assert set(GOALS) <= FIGURES
    details = report["details"]
    # Each figure is the ratio of the two measurements it names.
    extract = details["extract"]
    # The anchor is plain `transformers`, outside our code: its output is the hooked activation itself.
    efficiency = extract["extract_tokens_per_s"] / extract["plain_transformers_tokens_per_s"]
    assert math.isclose(report["figures"]["extract_efficiency"], efficiency)
    overhead = extract["plain_transformers_tokens_per_s"] / extract["bridge_forward_tokens_per_s"]
    assert math.isclose(report["figures"]["bridge_overhead"], overhead)
    agreement = extract["plain_transformers_vs_hook"]
    assert agreement["compared"] and agreement["hook"] == "blocks.1.hook_resid_post"
    assert agreement["max_abs_diff"] <= 1e-4 * agreement["max_abs_activation"]
    step = details["train_step"]
    assert step["flops_per_step"] == 12 * step["shape"]["batch_tokens"] * step["shape"]["d_in"] * step["shape"]["d_sae"]
    assert math.isclose(report["figures"]["train_efficiency"], step["step_flops_per_s"] / step["matmul_flops_per_s"])
    assert 0 <= report["figures"]["loader_stall"] < 1
    assert "train_efficiency" in result.stderr  # the table is printed
