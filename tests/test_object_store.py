"""Stores on object storage: extract to and train from an S3 server the test starts on 127.0.0.1 (moto)."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from conftest import interrupt_extraction_after, invoke, pipeline_command
from safetensors.torch import load_file

from pipeline.artifacts import sae_outputs
from pipeline.core.errors import PipelineError
from pipeline.params import SAEConfig, load_params
from pipeline.store import ActivationStore

SAE = {"a": {"expansion": 2, "batch_size": 8, "lr": 2e-3, "epochs": 1}}


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint, monkeypatch) -> str:
    """A fresh, empty bucket; the environment points S3 clients (this process's and its children's) at it."""
    import s3fs

    for name, value in {
        "AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    name = f"bucket-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(endpoint_url=s3_endpoint).mkdir(name)
    return f"s3://{name}"


@pytest.fixture
def local_store(tiny_params) -> Path:
    """The same extraction on the local disk: the reference."""
    assert invoke("extract", "--params", str(tiny_params)).exit_code == 0
    return Path(load_params(tiny_params).extract.store)


def arrays(where: str | Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(where), mode="r")
    return {f"{s}/{n}": group[s][n][:] for s in group.group_keys() for n in group[s].array_keys()}


def assert_same_arrays(expected: str | Path, found: str | Path) -> None:
    reference, stored = arrays(expected), arrays(found)
    assert reference.keys() == stored.keys()
    for key, values in reference.items():
        assert np.array_equal(values, stored[key]), key


def objects(url: str) -> list[str]:
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    root = url.removeprefix("s3://")
    return sorted(path[len(root) + 1 :] for path in fs.find(root))


def test_extract_to_s3_then_train_from_it(tmp_path, tiny_params, local_store, bucket):
    url = f"{bucket}/runs/activations"
    result = invoke("extract", "--params", str(tiny_params), "-S", f"extract.store={url}")
    assert result.exit_code == 0, result.output
    assert_same_arrays(local_store, url)
    on_s3, local = ActivationStore(url), ActivationStore(local_store)
    assert on_s3.fingerprint == local.fingerprint  # every file's bytes, by the manifest's checksums
    assert not [name for name in objects(url) if name.startswith("progress")]
    assert "up to date" in invoke("extract", "--params", str(tiny_params), "-S", f"extract.store={url}").stderr

    # In memory (the split fits the budget) and streamed out of core (a budget of a few chunks): the same SAE
    # from either store.
    weights, details = {}, {}
    for loading, budget_gb in (("resident", 8.0), ("streamed", 1e-4)):
        for source, store in (("s3", url), ("disk", local_store)):
            out = tmp_path / f"{loading}-{source}"
            params = _train_params(tmp_path / f"{out.name}.yaml", tiny_params, store, out, budget_gb)
            result = invoke("train", "--params", str(params))
            assert result.exit_code == 0, result.output
            paths = sae_outputs(out, "a", SAEConfig(**SAE["a"]))
            weights[loading, source] = load_file(paths["saelens"] / "sae_weights.safetensors")
            details[loading, source] = torch.load(paths["checkpoint"], weights_only=True)["meta"]
        for name, value in weights[loading, "disk"].items():
            assert torch.equal(weights[loading, "s3"][name], value), (loading, name)
        assert details[loading, "s3"]["store"] == url
        assert details[loading, "s3"]["loader_order"].startswith(loading)


def _train_params(path: Path, base: Path, store: str | Path, out_dir: Path, memory_budget_gb: float) -> Path:
    params = yaml.safe_load(base.read_text())
    params["extract"]["store"] = str(store)
    params["train"].update(seq_len=64, out_dir=str(out_dir), memory_budget_gb=memory_budget_gb)
    path.write_text(yaml.safe_dump({**params, "sae": SAE}))
    return path


def test_verify_finds_a_changed_object(tiny_params, bucket):
    import s3fs

    url = f"{bucket}/activations"
    store_override = ("-S", f"extract.store={url}")
    assert invoke("extract", "--params", str(tiny_params), *store_override).exit_code == 0
    assert invoke("verify", "--params", str(tiny_params), *store_override).exit_code == 0
    shard = next(name for name in objects(url) if re.fullmatch(r"train/blocks\.1\.hook_resid_post/c/1/0", name))
    fs = s3fs.S3FileSystem()
    damaged = bytearray(fs.cat_file(f"{url}/{shard}"))
    damaged[100] ^= 0xFF  # the same size: only the checksum can tell
    fs.pipe_file(f"{url}/{shard}", bytes(damaged))
    result = invoke("verify", "--params", str(tiny_params), *store_override)
    assert result.exit_code == 2
    assert f"shard file {shard} does not match its checksum" in result.stderr


def test_an_interrupted_s3_store_is_refused_until_two_nodes_resume_it(
    tmp_path, tiny_params, local_store, bucket, monkeypatch
):
    url = f"{bucket}/activations"
    interrupt_extraction_after(3, monkeypatch)
    assert invoke("extract", "--params", str(tiny_params), "-S", f"extract.store={url}").exit_code == 130
    # Staged beside its final prefix: nothing a reader would take for a store is there, and it says what to do.
    with pytest.raises(PipelineError, match=r"an interrupted extraction is there: run `pipeline extract --resume`"):
        ActivationStore(url)
    result = invoke("train", "--params", str(tiny_params), "-S", f"extract.store={url}")
    assert result.exit_code == 2 and "no activation store at" in result.stderr
    record = json.loads(objects_text(f"{url}.partial", "progress.json"))
    assert sum(len(indices) for indices in record["shards"].values()) == 3

    # Two machines share the store through S3 alone: two torchrun agents, one process each, finish it.
    args = ("extract", "--params", str(tiny_params), "-S", f"extract.store={url}", "--resume", "-v")
    output = pipeline_command(*args, cwd=tmp_path, nodes=2).stderr
    pending = re.findall(r"rank (\d) of 2: (\d+) of the (\d+) pending shards", output)
    n_shards = sum(-(-len(tokens) // 2048) for tokens in _tokens(local_store))
    assert sorted(rank for rank, _, _ in pending) == ["0", "1"]
    assert all(int(total) == n_shards - 3 for _, _, total in pending)  # nothing written before is redone
    assert_same_arrays(local_store, url)
    assert ActivationStore(url).fingerprint == ActivationStore(local_store).fingerprint
    assert not [name for name in objects(url) if name.startswith("progress")]


def objects_text(url: str, name: str) -> str:
    import s3fs

    return s3fs.S3FileSystem().cat_file(f"{url}/{name}").decode()


def _tokens(store: Path) -> list[np.ndarray]:
    opened = ActivationStore(store)
    return [opened.tokens(split) for split in opened.splits]


def test_a_prefix_holding_other_objects_is_left_alone(tiny_params, bucket):
    import s3fs

    url = f"{bucket}/results"
    s3fs.S3FileSystem().pipe_file(f"{url}/notes.txt", b"a user's file")
    result = invoke("extract", "--params", str(tiny_params), "-S", f"extract.store={url}")
    assert result.exit_code == 2
    assert "holds objects that this pipeline did not write" in result.stderr
    assert objects(url) == ["notes.txt"]


def test_a_scheme_without_its_library_is_one_clear_line(tiny_params):
    result = invoke("extract", "--params", str(tiny_params), "-S", "extract.store=nosuchscheme://bucket/x")
    assert result.exit_code == 2
    assert "cannot open nosuchscheme://bucket/x" in result.stderr


def test_missing_credentials_are_one_clear_line(tiny_params, bucket, monkeypatch):
    from botocore.exceptions import NoCredentialsError

    def no_credentials(*args, **kwargs):
        raise NoCredentialsError()

    monkeypatch.setattr(ActivationStore, "__init__", no_credentials)  # as s3fs raises it on the first request
    result = invoke("train", "--params", str(tiny_params), "-S", f"extract.store={bucket}/activations")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: object storage: Unable to locate credentials"


def test_an_s3_extraction_stopped_while_creating_arrays_resumes(tiny_params, local_store, bucket, monkeypatch):
    from test_faults import interrupt_creating_array, store_contents

    url = f"{bucket}/activations"
    override = ("-S", f"extract.store={url}")
    with monkeypatch.context() as patch:  # the test split's tokens: metadata written, data not
        patch.setattr(zarr.Group, "create_array", interrupt_creating_array(5, half=True))
        assert invoke("extract", "--params", str(tiny_params), *override).exit_code == 130
    result = invoke("extract", "--resume", "--params", str(tiny_params), *override)
    assert result.exit_code == 0, result.output
    assert store_contents(url) == store_contents(local_store)


LOCK_HOLDER = """
import sys, time
from pipeline.core.location import open_location
with open_location(sys.argv[1]).lock():
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_locked_prefix_stops_a_second_extraction_and_a_dead_holders_lock_is_taken_over(
    tiny_params, bucket, monkeypatch
):
    import s3fs

    from pipeline.core import locks

    url = f"{bucket}/activations"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, url], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = invoke("extract", "--params", str(tiny_params), "-S", f"extract.store={url}")
        assert result.exit_code == 2, result.output
        assert "is being written by another run" in result.stderr and f"pid {holder.pid} on host" in result.stderr
        assert objects(url) == []  # the second run wrote nothing
    finally:
        holder.kill()  # SIGKILL: its lock object stays, with its last heartbeat
        holder.wait()
    lock = f"{url.removeprefix('s3://')}.lock"
    assert json.loads(s3fs.S3FileSystem().cat_file(lock))["pid"] == holder.pid
    result = invoke("extract", "--params", str(tiny_params), "-S", f"extract.store={url}")  # at once: its pid
    assert result.exit_code == 0, result.output  # on this host is gone, so the holder is dead
    assert "took over the lock of a run that is no longer running" in " ".join(result.stderr.split())  # (wrapped)
    assert ActivationStore(url).attrs["manifest"]
    s3fs.S3FileSystem().invalidate_cache()
    assert not s3fs.S3FileSystem().exists(lock)  # released when the run ended
    # A holder on another machine that just stopped looks alive until its heartbeat is older than the timeout.
    other = f"{bucket}/other"
    record = {"host": "another-machine", "pid": holder.pid, "heartbeat": time.time()}
    s3fs.S3FileSystem().pipe_file(f"{other.removeprefix('s3://')}.lock", json.dumps(record).encode())
    result = invoke("extract", "--params", str(tiny_params), "-S", f"extract.store={other}")
    assert result.exit_code == 2 and "pid" in result.stderr and "on host another-machine" in result.stderr
    monkeypatch.setattr(locks, "LOCK_STALE_AFTER_S", 0.5)
    time.sleep(1.0)
    result = invoke("extract", "--params", str(tiny_params), "-S", f"extract.store={other}")
    assert result.exit_code == 0, result.output
    assert "took over the lock of a run that stopped refreshing it" in " ".join(result.stderr.split())


@pytest.mark.parametrize("sigint", ["handled", "ignored"])
def test_a_lock_is_kept_alive_and_a_holder_that_lost_it_stops(bucket, monkeypatch, sigint):
    """Also where the run started with SIGINT ignored, as `nohup pipeline extract &` starts it."""
    import signal

    import s3fs

    from pipeline.core import locks
    from pipeline.core.location import open_location

    monkeypatch.setattr(locks, "LOCK_HEARTBEAT_S", 0.1)
    url, fs = f"{bucket}/activations", s3fs.S3FileSystem()
    lock = f"{url.removeprefix('s3://')}.lock"
    started_with = signal.signal(signal.SIGINT, signal.default_int_handler if sigint == "handled" else signal.SIG_IGN)
    try:
        with open_location(url).lock():
            first = json.loads(fs.cat_file(lock))["heartbeat"]
            time.sleep(0.5)
            assert json.loads(fs.cat_file(lock))["heartbeat"] > first  # refreshed while the run lives
        with pytest.raises(KeyboardInterrupt), open_location(url).lock():
            fs.pipe_file(lock, json.dumps({"host": "elsewhere", "pid": 1, "heartbeat": time.time()}).encode())
            deadline = time.monotonic() + 30  # another run took the lock over: the next refresh finds it changed
            while time.monotonic() < deadline:  # and stops this run (within 0.1 s, unless the machine is loaded)
                time.sleep(0.05)
    finally:
        left = signal.signal(signal.SIGINT, started_with)
    assert json.loads(fs.cat_file(lock))["host"] == "elsewhere"  # the new holder's lock is left to it
    assert left == (signal.default_int_handler if sigint == "handled" else signal.SIG_IGN)  # restored on release


def test_replacing_an_s3_store_keeps_the_old_one_readable_until_the_new_one_is_complete(
    tiny_params, bucket, monkeypatch
):
    from pipeline.core.location import open_location
    from pipeline.extract.shards import ShardExtractor

    url = f"{bucket}/activations"
    old_params = ("--params", str(tiny_params), "-S", f"extract.store={url}", "-S", "data.max_docs=30")
    new_params = ("--params", str(tiny_params), "-S", f"extract.store={url}")
    assert invoke("extract", *old_params).exit_code == 0
    old = ActivationStore(url).fingerprint
    with monkeypatch.context() as patch:  # a changed extraction, interrupted midway
        interrupt_extraction_after(3, patch)
        assert invoke("extract", *new_params).exit_code == 130
    assert ActivationStore(url).fingerprint == old  # the old store is untouched and complete

    fs = open_location(url).fs  # fsspec shares one filesystem object between the stages and this test
    real_copy = fs.copy

    def copy_half_then_die(sources, targets, **kwargs):  # the commit dies after half of the new objects
        real_copy(sources[: len(sources) // 2], targets[: len(targets) // 2], **kwargs)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(fs, "copy", copy_half_then_die)
        assert invoke("extract", "--resume", *new_params).exit_code == 130
    with pytest.raises(PipelineError, match=r"an interrupted run finished it under \.partial"):
        ActivationStore(url)  # the old store is gone (its mark first), the new one complete beside it

    with monkeypatch.context() as patch:  # the next run finishes the commit: it computes nothing
        patch.setattr(ShardExtractor, "extract", lambda *a: pytest.fail("a finished shard was recomputed"))
        result = invoke("extract", *new_params)
        assert result.exit_code == 0, result.output
    new = ActivationStore(url)
    assert new.attrs["max_docs"] is None and new.fingerprint != old
    assert sorted(objects(url)) == sorted([*new.manifest, "zarr.json"])  # nothing of the old store is left
    assert objects(f"{url}.partial") == []
