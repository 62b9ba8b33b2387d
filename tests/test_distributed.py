"""Several processes under torchrun (gloo on CPU): the same store and the same SAEs as one process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import invoke

from pipeline.store import partial_path


def pipeline_command(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`pipeline <args>` in a fresh process, as a user runs it (the processes it starts are its children)."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


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
    from conftest import write_params

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
    from pipeline.extraction import ShardExtractor

    params = _params(tmp_path / "params.yaml", tiny_model_dir, gsm_dir, tmp_path / "store")
    original, calls = ShardExtractor.extract, {"n": 0}

    def interrupted(self, *args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(ShardExtractor, "extract", interrupted)
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
