"""Shared fixtures: a tiny random GPT-2 checkpoint, GSM8K-format rows, params files, the CLI runner."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.tiny import gpt2_tokenizer, make_rows, save_tiny_gpt2, train_tokenizer, write_jsonl

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def gsm_dir(tmp_path_factory) -> Path:
    """A local dataset directory with train.jsonl and test.jsonl in GSM8K's format."""
    root = tmp_path_factory.mktemp("gsm")
    write_jsonl(root / "train.jsonl", make_rows(120, seed=1))
    write_jsonl(root / "test.jsonl", make_rows(40, seed=2))
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random GPT-2 with a byte-level BPE tokenizer the test trains itself."""
    texts = [r["question"] + "\n" + r["answer"] for r in make_rows(300, seed=3)]
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), train_tokenizer(texts))


@pytest.fixture(scope="session")
def real_data() -> Path:
    """`../shared/data` (real GSM8K and GPT-2 tokenizer); tests using it skip where it is absent."""
    if not (SHARED_DATA / "gsm8k" / "test.jsonl").is_file():
        pytest.skip("../shared/data (real GSM8K + GPT-2 tokenizer) is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def gpt2_tokenizer_model_dir(real_data, tmp_path_factory) -> Path:
    """A tiny random GPT-2 carrying the real GPT-2 tokenizer (built from ../shared/data)."""
    tokenizer = gpt2_tokenizer(real_data / "gpt2-tokenizer" / "gpt2.tiktoken")
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2-real-tok"), tokenizer, n_layer=2, n_positions=512)


def write_params(path: Path, **sections: dict) -> Path:
    """A params file: the project's params.yaml with `sections` merged in (section -> {key: value})."""
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    for section, values in sections.items():
        params.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="session")
def labelled(tmp_path_factory, tiny_model_dir, gsm_dir) -> dict:
    """The tiny model's extraction of the GSM8K-format rows, and its token labels (`pipeline label`)."""
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
    from pipeline.store import ActivationStore

    return {"root": root, "params": params, "store": ActivationStore(root / "model-store")}


def labelled_store(path: Path, labelled: dict, hook: str, activations) -> Path:
    """A store of the labelled extraction's tokens (so its labels apply) holding `activations(number)` at `hook`:
    float activations made from each token's `number` label (1: a number token, else 0), one split at a time."""
    from pipeline.label.label_set import LabelSet
    from pipeline.store.writer import StoreWriter

    model_store, labels = labelled["store"], LabelSet(labelled["root"] / "labels")
    attrs = {name: model_store.attrs[name] for name in ("splits", "model", "dataset", "n_ctx", "bos_token_id",
                                                         "template", "token_sha256")}  # fmt: skip
    width = None
    writer = None
    for split in model_store.splits:
        number = (labels.tokens(split)["number"] == 1).astype(np.float64)
        x = np.asarray(activations(number), dtype=np.float32)
        if writer is None:
            width = x.shape[1]
            writer = StoreWriter(path, attrs | {"hooks": [hook], "d_model": width, "dtype": "float32",
                                               "shard_tokens": 1024, "chunk_tokens": 128}, resume=False)  # fmt: skip
        writer.add_split(split, model_store.tokens(split), model_store.doc_offsets(split))
        for index, start, end in writer.pending_shards(split):
            writer.write_shard(split, index, start, {hook: x[start:end]})
    writer.finalize({})
    return path


@pytest.fixture
def tiny_params(tmp_path, tiny_model_dir, gsm_dir) -> Path:
    """Params for a fast CPU run on the tiny model and the local rows, writing under tmp_path."""
    return write_params(
        tmp_path / "params.yaml",
        model={"name": str(tiny_model_dir), "device": "cpu"},
        data={"dataset": str(gsm_dir)},
        extract={
            "hooks": ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"],
            "store": str(tmp_path / "activations"),
            "batch_tokens": 2048,
            "shard_tokens": 2048,
            "chunk_tokens": 512,
        },
        train={"hook": "blocks.1.hook_resid_post", "device": "cpu", "out_dir": str(tmp_path / "artifacts")},
    )


@pytest.fixture
def frozen_decoder(monkeypatch) -> None:
    """Every SAE built during the test keeps its random initial decoder (for checks that must then fail)."""
    from pipeline.saes.base import SparseAutoencoder

    original_init = SparseAutoencoder.__init__

    def init_frozen(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.W_dec.requires_grad_(False)

    monkeypatch.setattr(SparseAutoencoder, "__init__", init_frozen)


def pipeline_command(*args: str, cwd: Path, threads: int | None = None, nodes: int = 1) -> subprocess.CompletedProcess:
    """`pipeline <args>` in a fresh process, as a user runs it (the processes it starts are its children).

    `threads`: CPU threads per process (OMP_NUM_THREADS); by default the processes share the cores.
    `nodes` > 1: as that many machines of one process each start it: torchrun agents that meet at a c10d
    rendezvous on 127.0.0.1 (the output returned is all of theirs).
    """
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "OMP_NUM_THREADS")}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", "pipeline.cli", *args]
    if nodes > 1:
        rendezvous = ["--rdzv-id", "test", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}"]
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node", "1"]
        command = [*torchrun, *rendezvous, "-m", "pipeline.cli", *args]
    agents = [
        subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(nodes)
    ]
    try:
        outputs = [agent.communicate(timeout=120) for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    for agent, (_, stderr) in zip(agents, outputs, strict=True):
        assert agent.returncode == 0, stderr[-3000:]
    return subprocess.CompletedProcess(command, 0, *("".join(streams) for streams in zip(*outputs, strict=True)))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def interrupt_extraction_after(n_shards: int, monkeypatch) -> dict[str, int]:
    """Ctrl-C as the extraction starts shard n_shards + 1; returns the count of shards started (lower it to let a
    later run go on)."""
    from pipeline.extract.shards import ShardExtractor

    original = ShardExtractor.extract
    calls = {"n": 0}

    def interrupted(self, *args):
        calls["n"] += 1
        if calls["n"] > n_shards:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(ShardExtractor, "extract", interrupted)
    return calls


# SAEBench's names for the architectures it plots (TRAINER_LABELS in sae_bench/sae_bench_utils/graphing_utils.py,
# SAEBench 0.6.0), by ours.
SAEBENCH_ARCHITECTURES = {
    "relu": "standard", "topk": "topk", "batchtopk": "batch_topk", "jumprelu": "jumprelu",
    "matryoshka": "matryoshka_batch_topk",
}  # fmt: skip


def saebench_accepted(path: Path) -> dict:
    """The SAEBench core JSON at `path`, checked with SAEBench's own JSON schema and pydantic classes, with the
    fields SAEBench's plots read (`sae_cfg_dict`: architecture by SAEBench's name, training tokens)."""
    saebench = pytest.importorskip("sae_bench.evals.core.eval_output", reason="pip install --no-deps sae-bench")
    import jsonschema
    from pydantic import TypeAdapter

    schema = json.loads((Path(saebench.__file__).parent / "eval_output_schema_core.json").read_text())
    written = json.loads(path.read_text())
    jsonschema.validate(written, schema)
    TypeAdapter(saebench.CoreEvalOutput).validate_python(written)
    cfg = written["sae_cfg_dict"]
    assert cfg["architecture"] == SAEBENCH_ARCHITECTURES[cfg["metadata"]["architecture"]], path
    assert cfg["training_tokens"] > 0, path
    return written


def readme_command(start: str) -> list[str]:
    """The README's command line that begins with `start` (continuation lines joined, comments dropped), as the
    arguments of `pipeline`: a test runs it as a user copies it."""
    text = (PROJECT_ROOT / "README.md").read_text().replace("\\\n", " ")
    (line,) = [line for line in text.splitlines() if line.startswith(start)]
    words = shlex.split(line, comments=True)
    assert words[0] == "pipeline", line
    return words[1:]


def invoke(*args: str):
    """Run the CLI in-process; returns the click Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(app, list(args))


def write_synthetic_store(
    path: Path,
    n_train: int = 40_000,
    n_test: int = 4_000,
    d: int = 128,
    n_dirs: int = 512,
    p_active: float = 0.008,
    noise: float = 0.01,
    seed: int = 0,
    doc_len: int = 100,
) -> np.ndarray:
    """A store whose vectors are sparse non-negative combinations of a known dictionary; returns the dictionary.

    Each of `n_dirs` random unit directions is active with probability `p_active` (about 4 at a time), with a
    magnitude uniform in [1, 2], plus Gaussian noise of std `noise` per dimension.
    """
    from pipeline.store.writer import StoreWriter

    rng = np.random.default_rng(seed)
    dictionary = rng.standard_normal((n_dirs, d))
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    attrs = {
        "hooks": ["synthetic"], "d_model": d, "dtype": "float32", "shard_tokens": 8192, "chunk_tokens": 1024,
        "splits": ["train", "test"], "model": "synthetic", "dataset": "synthetic", "n_ctx": doc_len,
        "bos_token_id": 0,
    }  # fmt: skip
    writer = StoreWriter(path, attrs, resume=False)
    for split, n in (("train", n_train), ("test", n_test)):
        active = rng.random((n, n_dirs)) < p_active
        x = (rng.uniform(1.0, 2.0, (n, n_dirs)) * active) @ dictionary + noise * rng.standard_normal((n, d))
        writer.add_split(split, np.zeros(n, np.int32), np.arange(0, n + 1, doc_len, dtype=np.int64))
        for index, start, end in writer.pending_shards(split):
            writer.write_shard(split, index, start, {"synthetic": x[start:end].astype(np.float32)})
    writer.finalize({})
    return dictionary.astype(np.float32)
