"""Several processes under torchrun (gloo on CPU): the same store and the same SAEs as one process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import interrupt_extraction_after, invoke, pipeline_command, write_params, write_synthetic_store
from safetensors.torch import load_file

from pipeline.artifacts import sae_outputs
from pipeline.core.location import partial_path
from pipeline.params import SAEConfig


def shares(output: str) -> dict[int, tuple[int, int]]:
    """rank -> (its shards, all pending shards), from the ranks' debug lines."""
    lines = re.findall(r"rank (\d+) of 2: (\d+) of the (\d+) pending shards", output)
    return {int(rank): (int(mine), int(total)) for rank, mine, total in lines}


def assert_same_store(expected: Path, found: Path) -> None:
    """Every file byte for byte, but for the command recorded in the group's attributes."""
    names = sorted(p.relative_to(expected).as_posix() for p in expected.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(found).as_posix() for p in found.rglob("*") if p.is_file())
    for name in names:
        if name == "zarr.json":
            a, b = (json.loads((root / name).read_text())["attributes"] for root in (expected, found))
            assert {**a, "command": None} == {**b, "command": None}
        else:
            assert (expected / name).read_bytes() == (found / name).read_bytes(), name


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory, tiny_model_dir, gsm_dir) -> Path:
    """The tiny model's store written by one process."""
    root = tmp_path_factory.mktemp("one-process")
    params = _params(root / "params.yaml", tiny_model_dir, gsm_dir, root / "store")
    assert invoke("extract", "--params", str(params)).exit_code == 0
    return root / "store"


def _params(path: Path, model: Path, gsm: Path, store: Path) -> Path:
    return write_params(
        path,
        model={"name": str(model), "device": "cpu"},
        data={"dataset": str(gsm)},
        extract={
            "hooks": ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"],
            "store": str(store),
            "batch_tokens": 2048,
            "shard_tokens": 2048,
            "chunk_tokens": 512,
        },
        train={"hook": "blocks.1.hook_resid_post", "device": "cpu"},
    )


def test_two_processes_write_the_one_process_store(tmp_path, tiny_model_dir, gsm_dir, reference_store):
    params = _params(tmp_path / "params.yaml", tiny_model_dir, gsm_dir, tmp_path / "store")
    result = pipeline_command("extract", "--params", str(params), "-S", "extract.nproc=2", "-v", cwd=tmp_path)
    ranks = shares(result.stderr)
    assert set(ranks) == {0, 1} and all(mine > 0 for mine, _ in ranks.values())  # both computed shards
    assert sum(mine for mine, _ in ranks.values()) == ranks[0][1]
    assert_same_store(reference_store, tmp_path / "store")
    assert not partial_path(tmp_path / "store").exists()


def test_resume_with_another_world_size(tmp_path, tiny_model_dir, gsm_dir, reference_store, monkeypatch):
    """One process is interrupted; its record is split as three killed ranks would leave it; two ranks finish."""
    params = _params(tmp_path / "params.yaml", tiny_model_dir, gsm_dir, tmp_path / "store")
    interrupt_extraction_after(4, monkeypatch)
    assert invoke("extract", "--params", str(params)).exit_code == 130
    partial = partial_path(tmp_path / "store")
    record = json.loads((partial / "progress.json").read_text())
    done = [(split, index) for split, indices in record["shards"].items() for index in indices]
    assert len(done) == 4
    for rank in range(3):  # rank r keeps the shards it wrote, and the checksums of their files
        mine = done[rank::3]
        shards = {split: [i for s, i in mine if s == split] for split in record["shards"]}
        files = {
            name: r for name, r in record["files"].items()
            if any(name.startswith(f"{s}/") and f"/c/{i}/" in name for s, i in mine)
        }  # fmt: skip
        name = "progress.json" if rank == 0 else f"progress-{rank}.json"
        (partial / name).write_text(json.dumps({"shards": shards, "files": files}))

    args = ("extract", "--params", str(params), "--resume", "-S", "extract.nproc=2", "-v")
    ranks = shares(pipeline_command(*args, cwd=tmp_path).stderr)
    stats = json.loads((reference_store / "zarr.json").read_text())["attributes"]["split_stats"]
    n_shards = sum(-(-s["n_tokens"] // 2048) for s in stats.values())
    assert ranks[0][1] == ranks[1][1] == n_shards - 4  # nothing written before is computed again
    assert_same_store(reference_store, tmp_path / "store")


# A relu SAE over two epochs, a topk SAE whose latents die after two batches, so that AuxK depends on the merged
# statistics, and a skip transcoder (of the store's one hook to itself: the input and target pair of rows, their
# two scales, the skip path). (Batch-selected SAEs select per rank when data-parallel: not expected to match.)
CONFIGS = {
    "a": {"expansion": 4, "batch_size": 8, "lr": 2e-3, "epochs": 2},
    "b": {"architecture": "topk", "k": 4, "dead_tokens": 512, "expansion": 4, "batch_size": 4, "lr": 2e-3, "epochs": 1},
    "c": {"expansion": 2, "batch_size": 8, "lr": 2e-3, "epochs": 1, "target_hook": "synthetic", "skip": True},
}


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small-store")
    write_synthetic_store(root / "store", n_train=8192, n_test=512, d=64, n_dirs=128)
    return root / "store"


@pytest.fixture(scope="module")
def one_process_saes(tmp_path_factory, small_store) -> Path:
    """Both configs trained by one process: the reference for the other modes."""
    root = tmp_path_factory.mktemp("one-process-saes")
    assert invoke("train", "--params", str(_train_params(root, small_store))).exit_code == 0
    return root / "artifacts"


def _train_params(root: Path, store: Path) -> Path:
    """Params that train exactly `CONFIGS` (write_params merges into the project's A/B/C)."""
    path = write_params(
        root / "params.yaml",
        extract={"store": str(store)},
        train={
            "hook": "synthetic", "seq_len": 64, "l1_coeff": 3e-3, "device": "cpu", "exclude_bos": False,
            "log_every": 4, "checkpoint_every": 4, "out_dir": str(root / "artifacts"),
        },
    )  # fmt: skip
    params = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**params, "sae": CONFIGS}))
    return path


def trained(out_dir: Path, key: str) -> tuple[dict[str, torch.Tensor], list[dict], dict]:
    """Config `key`'s SAELens weights, training curve and details."""
    paths = sae_outputs(out_dir, key, SAEConfig(**CONFIGS[key]))
    state = torch.load(paths["checkpoint"], weights_only=True)
    details = json.loads(paths["train_details"].read_text())
    return load_file(paths["saelens"] / "sae_weights.safetensors"), state["curve"], details


def test_data_parallel_training_matches_one_process(tmp_path, small_store, one_process_saes):
    params = _train_params(tmp_path, small_store)
    pipeline_command("train", "--params", str(params), "-S", "train.nproc=2", cwd=tmp_path)
    for key in CONFIGS:
        weights, curve, details = trained(tmp_path / "artifacts", key)
        expected_weights, expected_curve, expected_details = trained(one_process_saes, key)
        assert details["processes"] == 2 and details["distribute"] == "data"
        assert details["steps"] == expected_details["steps"] > 0
        for name, value in expected_weights.items():
            torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-5, msg=f"{key}.{name}")
        assert [row["step"] for row in curve] == [row["step"] for row in expected_curve]
        for row, expected in zip(curve, expected_curve, strict=True):
            for term in ("loss", "mse", "l0"):
                assert row[term] == pytest.approx(expected[term], rel=1e-4), (key, row["step"], term)
    assert not (tmp_path / "artifacts/checkpoints/config_a_4x.pt").exists()


def test_configs_across_ranks_match_one_process(tmp_path, small_store, one_process_saes):
    params = _train_params(tmp_path, small_store)
    args = ("train", "--params", str(params), "-S", "train.nproc=2", "-S", "train.distribute=configs")
    # A matrix product's rounding depends on how many threads split its sums (1e-9 apart here otherwise).
    pipeline_command(*args, cwd=tmp_path, threads=torch.get_num_threads())
    for key in CONFIGS:
        weights, curve, details = trained(tmp_path / "artifacts", key)
        expected_weights, expected_curve, _ = trained(one_process_saes, key)
        # a and c on rank 0 (each its own read: c is a transcoder), b on rank 1
        assert details["trained_with"] == [key] and details["distribute"] == "configs"
        for name, value in expected_weights.items():
            assert torch.equal(weights[name], value), f"{key}.{name}"
        assert curve == expected_curve


def test_data_parallel_resumes_a_one_process_run(tmp_path, small_store, one_process_saes, monkeypatch):
    from pipeline.train.trainer import Trainer

    original, blocks = Trainer._train_on_block, {"a": 0}

    def killed_midway(self, run, epoch, block_index, block, bar):
        blocks[run.key] = blocks.get(run.key, 0) + 1
        if blocks[run.key] == 11:  # after the checkpoint at block 8
            raise KeyboardInterrupt
        return original(self, run, epoch, block_index, block, bar)

    monkeypatch.setattr(Trainer, "_train_on_block", killed_midway)
    params = _train_params(tmp_path, small_store)
    assert invoke("train", "--params", str(params)).exit_code == 130
    checkpoint = torch.load(tmp_path / "artifacts/checkpoints/config_a_4x.pt", weights_only=True)
    assert checkpoint["step"] == 8  # the checkpoint after 8 blocks of one batch of config a

    result = pipeline_command("train", "--params", str(params), "--resume", "-S", "train.nproc=2", cwd=tmp_path)
    assert "resumed config_a_4x, config_b_4x" in result.stderr
    for key in CONFIGS:
        weights, curve, details = trained(tmp_path / "artifacts", key)
        expected_weights, expected_curve, _ = trained(one_process_saes, key)
        assert details["processes"] == 2
        for name, value in expected_weights.items():
            torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-5, msg=f"{key}.{name}")
        assert [row["step"] for row in curve] == [row["step"] for row in expected_curve]


def test_an_error_in_the_processes_is_their_line_and_exit_code(tmp_path, small_store):
    """No launcher traceback: each process's one line (saying which process), and the processes' exit code."""
    params = _train_params(tmp_path, small_store)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", "--params", str(params), "-S", "train.nproc=2",
         "-S", "train.seq_len=63", "-S", "sae.a.batch_size=1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    message = "sae.a: a batch of 63 tokens does not split evenly over 2 processes"
    lines = sorted(line.split(";")[0] for line in result.stderr.strip().splitlines())
    assert lines == [f"error: [process 1] {message}", f"error: {message}"], result.stderr


def test_work_that_does_not_divide_over_the_ranks_is_one_clear_line(tmp_path, small_store, monkeypatch):
    from pipeline.core import distributed

    monkeypatch.setattr(distributed, "world_size", lambda: 5)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    params = _train_params(tmp_path, small_store)
    result = invoke("train", "--params", str(params), "-S", "train.distribute=configs")
    assert result.exit_code == 2
    assert "deals 3 config(s) (a, b, c) to 5 processes; use at most 3 processes" in result.stderr
    result = invoke("train", "--params", str(params))
    assert result.exit_code == 2
    assert "sae.a: a batch of 512 tokens does not split evenly over 5 processes" in result.stderr


def test_more_processes_than_gpus_is_one_clear_line(monkeypatch, tmp_path):
    from bench import scaling as bench_scaling
    from pipeline.core.device import resolve_device
    from pipeline.core.errors import PipelineError
    from pipeline.params import load_params

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    params = load_params(write_params(tmp_path / "params.yaml", model={"device": "cuda"}))
    assert bench_scaling.run(params, 1, 1, None, tmp_path) == {}  # skipped (one GPU, two processes) before any I/O
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(PipelineError, match="process 1 on this machine has no GPU of its own: 1 visible"):
        resolve_device("cuda")


def test_fewer_shards_than_processes_is_a_warning(tmp_path, monkeypatch, caplog):
    import logging

    import numpy as np

    from pipeline.core import distributed
    from pipeline.store.ranks import open_writer
    from pipeline.store.writer import StoreWriter

    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    attrs = {
        "hooks": ["h"], "d_model": 4, "dtype": "float32", "shard_tokens": 4096, "chunk_tokens": 1024,
        "splits": ["train"], "model": "m", "dataset": "d", "n_ctx": 100, "bos_token_id": 0,
    }  # fmt: skip

    def prepare(writer: StoreWriter) -> None:
        writer.add_split("train", np.zeros(5000, np.int32), np.array([0, 5000]))

    with caplog.at_level(logging.WARNING):
        _, mine = open_writer(tmp_path / "store", attrs, False, prepare)
    assert len(mine) == 1  # rank 0 of 3 takes the first of the 2 shards
    assert "2 shard(s) to write for 3 processes: 1 of them have nothing to do" in caplog.text


def test_data_parallel_training_on_a_stream_matches_one_process(tmp_path):
    """Every rank generates the whole streamed synthetic split, so two data-parallel processes train on the
    batches one process does."""
    from test_synthetic import small_store_params

    params = small_store_params(tmp_path, "streamed", True)
    assert invoke("synth", "--params", params).exit_code == 0
    assert invoke("train", "--params", params).exit_code == 0
    two = tmp_path / "two-processes"
    pipeline_command("train", "--params", params, "-S", "train.nproc=2", "-S", f"train.out_dir={two}", cwd=tmp_path)
    one_process = torch.load(tmp_path / "artifacts-streamed/sae/config_s_2x_final.pt", weights_only=True)["sae"]
    data_parallel = torch.load(two / "sae/config_s_2x_final.pt", weights_only=True)["sae"]
    assert json.loads((two / "details/train_s.json").read_text())["processes"] == 2
    for name, value in one_process.items():
        torch.testing.assert_close(data_parallel[name], value, rtol=1e-4, atol=1e-5, msg=name)
