"""Faults and bad input: nothing a user has is lost or silently corrupted, and every refusal is one clear line."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import blake3
import numpy as np
import pytest
import torch
import zarr
from conftest import PROJECT_ROOT, interrupt_extraction_after, invoke, write_params, write_synthetic_store

from pipeline.core.errors import PipelineError
from pipeline.core.location import partial_path
from pipeline.params import load_params
from pipeline.store import ActivationStore

TRAIN_ON_SYNTHETIC = {
    "hook": "synthetic", "seq_len": 64, "device": "cpu", "exclude_bos": False, "checkpoint_every": 2,
}  # fmt: skip
SMALL_SAE = {"a": {"expansion": 2, "batch_size": 4, "lr": 1e-3, "epochs": 2}}


def synthetic_params(tmp_path: Path, n_train: int = 4000, sae: dict = SMALL_SAE) -> Path:
    """A synthetic store of `n_train` training tokens at tmp_path/store, and params training on it into tmp_path/out."""
    write_synthetic_store(tmp_path / "store", n_train=n_train, n_test=200)
    return write_params(
        tmp_path / "params.yaml", extract={"store": str(tmp_path / "store")}, sae=sae,
        train={**TRAIN_ON_SYNTHETIC, "out_dir": str(tmp_path / "out")},
    )  # fmt: skip


def one_line_error(result, *fragments: str) -> None:
    """The run failed with exit code 2 and one error line (beside any progress output) holding every fragment."""
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], result.stderr


def store_of(params: Path) -> Path:
    return Path(load_params(params).extract.store)


def run_python(code: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (a separate process: its own locks, limits and death)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd or PROJECT_ROOT, capture_output=True, text=True,
        timeout=timeout, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "tests")},
    )  # fmt: skip


# 1. Never replace a directory this pipeline did not write.


def test_extract_refuses_a_directory_that_is_not_a_store(tmp_path, tiny_params):
    precious = tmp_path / "my-files"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    result = invoke("extract", "--params", str(tiny_params), "-S", f"extract.store={precious}")
    one_line_error(result, f"{precious} is an existing directory that this pipeline did not write")
    assert (precious / "thesis.tex").read_text() == "years of work"
    empty = tmp_path / "empty"
    empty.mkdir()  # nothing to lose: an empty directory may become the store
    assert invoke("extract", "--params", str(tiny_params), "-S", f"extract.store={empty}").exit_code == 0
    assert ActivationStore(empty).splits == ["train", "test"]


@pytest.mark.parametrize("command", ["train", "verify"])
def test_a_store_path_that_is_a_file_is_named_as_one(tmp_path, tiny_params, command):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    one_line_error(invoke(command, "--params", str(tiny_params), "-S", f"extract.store={notes}"),
                   f"{notes} is a file, not an activation store: set extract.store to a directory")  # fmt: skip
    assert notes.read_text() == "mine"


@pytest.mark.parametrize("store", [".", "..", "./"])
def test_the_working_directory_is_never_a_store(tiny_params, store):
    result = invoke("extract", "--params", str(tiny_params), "-S", f"extract.store={store}")
    one_line_error(result, f"invalid extract.store: {store!r}", "not the working directory or one above it")


def test_train_refuses_to_replace_a_folder_that_is_not_an_sae(tmp_path):
    params = synthetic_params(tmp_path, n_train=2000)
    folder = tmp_path / "out/sae/config_a_2x"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    result = invoke("train", "--config", "a", "--params", str(params))
    one_line_error(result, f"{folder} is an existing directory that this pipeline did not write")
    assert (folder / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "out/checkpoints/config_a_2x.pt").exists()  # refused before any training


# 2. One writer at a time.


def test_a_store_being_written_is_locked_and_a_dead_holder_releases_it(tmp_path, tiny_params):
    store = store_of(tiny_params)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pipeline.core.locks import exclusive_lock\n"
         "with exclusive_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(120)", str(store)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = invoke("extract", "--params", str(tiny_params))
        one_line_error(result, "is being written by another run", f"pid {holder.pid} on host")
        assert not store.exists() and not partial_path(store).exists()  # the second run touched nothing
    finally:
        holder.kill()
        holder.wait()
    assert (store.parent / f"{store.name}.lock").is_file()  # the dead holder's lock file is still there...
    assert invoke("extract", "--params", str(tiny_params)).exit_code == 0  # ...and stale: the next run proceeds


# 3. A damaged store is found before it is used, and named.


@pytest.fixture
def extracted(tiny_params) -> tuple[Path, Path]:
    assert invoke("extract", "--params", str(tiny_params)).exit_code == 0
    return tiny_params, store_of(tiny_params)


SHARD = "train/blocks.1.hook_resid_post/c/0/0"  # shard_file(store, 0), as the manifest names it


def shard_file(store: Path, index: int = 1) -> Path:
    return store / "train" / "blocks.1.hook_resid_post" / "c" / str(index) / "0"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: f.unlink(), "is missing"),
        (lambda f: f.write_bytes(b""), "has 0 bytes instead of"),
        (lambda f: f.write_bytes(f.read_bytes()[:1000]), "has 1,000 bytes instead of"),
    ],
)
def test_a_missing_empty_or_truncated_shard_stops_training_naming_the_file(extracted, damage, message):
    params, store = extracted
    damage(shard_file(store))
    result = invoke("train", "--config", "a", "--params", str(params))
    one_line_error(result, "is damaged", "split train, array blocks.1.hook_resid_post", "c/1/0", message)


def test_a_read_error_names_split_hook_and_shard_file(extracted):
    params, store = extracted
    data = bytearray(shard_file(store).read_bytes())
    data[-8:] = b"\xff" * 8  # same size, broken shard index (zarr checks the index's checksum)
    shard_file(store).write_bytes(bytes(data))
    result = invoke("train", "--config", "a", "--params", str(params))
    one_line_error(result, "reading train/blocks.1.hook_resid_post failed in split train", "c/1/0")


def as_format_2(store: Path) -> None:
    """Rewrite a store's manifest as format 2 wrote it: sha256 checksums."""
    group = json.loads((store / "zarr.json").read_text())
    manifest = group["attributes"]["manifest"]
    for name, record in manifest["files"].items():
        record.pop("blake3")
        record["sha256"] = hashlib.sha256((store / name).read_bytes()).hexdigest()
    manifest["algorithm"] = "sha256"
    group["attributes"]["format_version"] = 2
    (store / "zarr.json").write_text(json.dumps(group))


@pytest.mark.parametrize("version", [3, 2])
def test_verify_finds_a_changed_byte_that_the_size_check_cannot(extracted, version):
    params, store = extracted
    manifest = ActivationStore(store).manifest
    assert manifest[SHARD] == {"size": shard_file(store, 0).stat().st_size,  # format 3: BLAKE3, as the library has it
                               "blake3": blake3.blake3(shard_file(store, 0).read_bytes()).hexdigest()}  # fmt: skip
    if version == 2:
        as_format_2(store)
        assert "is up to date" in invoke("extract", "--params", str(params)).output  # read as it is, not re-extracted
    result = invoke("verify", "--params", str(params))
    assert result.exit_code == 0 and "match their checksums" in result.stdout
    data = bytearray(shard_file(store, 0).read_bytes())
    data[100] ^= 0xFF  # one activation changed: same size, valid zarr
    shard_file(store, 0).write_bytes(bytes(data))
    ActivationStore(store)  # opening still works: sizes match
    one_line_error(invoke("verify", "--params", str(params)), "c/0/0 does not match its checksum")


# 4. --resume notices that the data changed.


def test_resume_refuses_when_the_dataset_content_changed(tmp_path, tiny_params, gsm_dir, monkeypatch):
    data = tmp_path / "gsm"
    shutil.copytree(gsm_dir, data)
    interrupt_extraction_after(2, monkeypatch)
    assert invoke("extract", "--params", str(tiny_params), "-S", f"data.dataset={data}").exit_code == 130
    monkeypatch.undo()
    rows = (data / "train.jsonl").read_text().splitlines()
    row = json.loads(rows[50])
    row["question"] = row["question"].replace("has", "had")  # same path, edited content
    rows[50] = json.dumps(row)
    (data / "train.jsonl").write_text("\n".join(rows) + "\n")
    result = invoke("extract", "--params", str(tiny_params), "-S", f"data.dataset={data}", "--resume")
    one_line_error(result, "cannot --resume", "token_sha256")


# 5. train --resume refuses other settings or another store.


def interrupted_training(tmp_path: Path, monkeypatch, checkpoints: int = 1) -> Path:
    """A training run on a new synthetic store, killed after its `checkpoints`-th checkpoint; returns its params
    file."""
    from pipeline.train.trainer import Trainer

    params = synthetic_params(tmp_path)
    original = Trainer.save_checkpoints
    saved = []

    def killed_after_checkpoints(self):
        original(self)
        saved.append(True)
        if len(saved) == checkpoints:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "save_checkpoints", killed_after_checkpoints)
        assert invoke("train", "--config", "a", "--params", str(params)).exit_code == 130
    assert (tmp_path / "out/checkpoints/config_a_2x.pt").is_file()
    return params


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.l1_coeff=0.01", "train.l1_coeff: 0.005 then, 0.01 now"),
        ("train.seed=3", "train.seed: 0 then, 3 now"),
        ("train.warmup_frac=0.2", "train.warmup_frac"),
        ("train.decorrelation_coeff=0", "train.decorrelation_coeff"),
        ("sae.a.lr=0.002", "sae.a.lr: 0.001 then, 0.002 now"),
        ("train.memory_budget_gb=0", "the loader's order: resident then, streamed in windows of 1 chunk of"),
    ],
)
def test_train_resume_refuses_changed_settings(tmp_path, monkeypatch, override, named):
    params = interrupted_training(tmp_path, monkeypatch)
    one_line_error(
        invoke("train", "--config", "a", "--params", str(params), "--resume", "-S", override), "cannot --resume", named
    )
    # What does not change the result may change: another budget that keeps the loader's order continues.
    resumed = invoke("train", "--config", "a", "--params", str(params), "--resume", "-S", "train.memory_budget_gb=1")
    assert resumed.exit_code == 0


def test_a_checkpoint_from_before_relu_decoder_norm_resumes_as_the_unit_recipe_it_was(tmp_path, monkeypatch):
    """Checkpoints written before `relu_decoder_norm` existed were trained with unit-norm decoders: they resume
    when that is asked for, and the default (free) is refused by name."""
    from pipeline.train.checkpoints import save_checkpoint

    params = interrupted_training(tmp_path, monkeypatch)
    directory = tmp_path / "out/checkpoints"
    state = torch.load(directory / "config_a_2x.pt", weights_only=True)
    for section in ("config", "train"):
        del state[section]["relu_decoder_norm"]
    save_checkpoint(state, directory, "config_a_2x")
    resume = ["train", "--config", "a", "--params", str(params), "--resume"]
    one_line_error(invoke(*resume), "sae.a.relu_decoder_norm: 'unit' then, 'free' now")
    assert "train.relu_decoder_norm" not in invoke(*resume).stderr  # the setting that applies is named once
    assert invoke(*resume, "-S", "train.relu_decoder_norm=unit").exit_code == 0


def test_train_resume_refuses_a_store_whose_content_changed(tmp_path, monkeypatch):
    params = interrupted_training(tmp_path, monkeypatch)
    shutil.rmtree(tmp_path / "store")
    write_synthetic_store(tmp_path / "store", n_train=4000, n_test=200, seed=1)  # same path and shape
    one_line_error(invoke("train", "--config", "a", "--params", str(params), "--resume"), "activation store's content")


def test_a_damaged_checkpoint_is_one_line_left_as_evidence_and_the_one_before_resumes(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    params = interrupted_training(tmp_path, monkeypatch, checkpoints=2)
    checkpoint, previous = (
        tmp_path / "out/checkpoints" / name for name in ("config_a_2x.pt", "config_a_2x.previous.pt")
    )
    assert torch.load(previous, weights_only=True)["step"] < torch.load(checkpoint, weights_only=True)["step"]
    damaged = checkpoint.read_bytes()[:1000]  # truncated, as by a disk fault or an interrupted copy
    checkpoint.write_bytes(damaged)
    result = invoke("train", "--config", "a", "--resume", "--params", str(params))
    one_line_error(result, f"checkpoint {checkpoint} is damaged", "it is left where it is",
                   f"continue from the one before it ({previous})", "rerun without --resume to start over")  # fmt: skip
    assert checkpoint.read_bytes() == damaged
    checkpoint.rename(tmp_path / "damaged.pt")
    assert invoke("train", "--config", "a", "--resume", "--params", str(params)).exit_code == 0
    assert (
        invoke("train", "--config", "a", "--params", str(params), "-S", f"train.out_dir={tmp_path / 'whole'}").exit_code
        == 0
    )
    resumed, whole = (load_file(tmp_path / out / "sae/config_a_2x/sae_weights.safetensors") for out in ("out", "whole"))
    assert all(torch.equal(resumed[name], whole[name]) for name in whole)
    assert not list((tmp_path / "out/checkpoints").glob("*.pt"))  # both removed once the final outputs exist


# 6. A swap interrupted between its two renames is finished by the next run; litter is removed.


def test_a_crash_between_the_renames_is_finished_without_recomputing(extracted, monkeypatch):
    params, store = extracted
    before = {p.relative_to(store): p.read_bytes() for p in store.rglob("*") if p.is_file()}
    crash = run_python(f"""
        import os
        import pipeline.core.atomic
        real_replace = os.replace
        calls = []

        def replace(src, dst):  # the process dies after moving the old store aside, before the new one moves in
            calls.append(src)
            real_replace(src, dst)
            if str(src) == {str(store)!r}:
                os._exit(9)

        pipeline.core.atomic.os.replace = replace
        from pipeline.cli import app
        app(["extract", "--force", "--params", {str(params)!r}])
    """)
    assert crash.returncode == 9, crash.stderr
    assert not store.exists() and partial_path(store).is_dir()  # the window: no store under the final name
    assert [p.name for p in store.parent.glob(f".{store.name}.old-*")]  # the previous store, set aside

    from pipeline.extract.shards import ShardExtractor

    monkeypatch.setattr(ShardExtractor, "extract", lambda *a: pytest.fail("a finished shard was recomputed"))
    result = invoke("extract", "--params", str(params))  # no --resume needed
    assert result.exit_code == 0, result.output
    after = {p.relative_to(store): p.read_bytes() for p in store.rglob("*") if p.is_file()}
    assert after.keys() == before.keys()
    for name in before:
        if name.name != "zarr.json" or name.parent != Path("."):  # the root attributes record the new command
            assert after[name] == before[name], name
    assert sorted(p.name for p in store.parent.iterdir() if p.name.startswith((store.name, f".{store.name}"))) == [
        "activations",
        "activations.lock",
    ]  # no .partial, .old-* or .tmp-* left


def test_temporaries_of_killed_runs_are_removed_by_the_next_write(tmp_path):
    from pipeline.core.atomic import remove_litter, write_json

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    target = tmp_path / "metrics.json"
    for litter in (f".metrics.json.tmp-{dead.pid}", f".metrics.json.old-{dead.pid}"):
        (tmp_path / litter).mkdir()
    alive = tmp_path / f".metrics.json.tmp-{os.getppid()}"  # a live process's temporary is never touched
    alive.write_text("in progress")
    write_json(target, {"x": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "metrics.json"]
    assert remove_litter(target) == []


# 7. Environment faults and bad values: one line, non-zero exit, nothing lost.


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    params = interrupted_training(tmp_path, monkeypatch)
    checkpoint = tmp_path / "out/checkpoints/config_a_2x.pt"
    saved = checkpoint.read_bytes()
    # A real write failure: the process may not write files larger than 64 KiB (a checkpoint is ~400 KB).
    done = run_python(f"""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
        from pipeline.cli import app
        app(["train", "--config", "a", "--resume", "--params", {str(params)!r}])
    """)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "could not write" in errors[0] and "config_a_2x" in errors[0]
    assert "Traceback" not in done.stderr
    assert checkpoint.read_bytes() == saved
    assert torch.load(checkpoint, weights_only=True)["step"] > 0
    assert not list(checkpoint.parent.glob(".*tmp*"))


def test_a_diverging_loss_stops_training_without_saving_nan_weights(tmp_path):
    params = synthetic_params(tmp_path, sae={"a": {**SMALL_SAE["a"], "lr": 1e30}})
    result = invoke("train", "--config", "a", "--params", str(params))
    one_line_error(result, "sae.a: the training loss became NaN or inf", "Lower sae.a.lr")
    assert not (tmp_path / "out/sae/config_a_2x_final.pt").exists()
    for checkpoint in (tmp_path / "out/checkpoints").glob("*.pt"):
        assert all(torch.isfinite(v).all() for v in torch.load(checkpoint, weights_only=True)["sae"].values())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sae.a.lr=.inf", "sae.a.lr must be a finite number, got inf"),
        ("sae.a.lr=nan", "sae.a.lr must be a finite number"),
        ("train.device=tpu", "invalid train.device: 'tpu' (allowed: auto, cpu, cuda, cuda:N or mps)"),
        ("model.device=gpu", "invalid model.device: 'gpu'"),
        ("train.warmup_frac=1.5", "invalid train.warmup_frac: 1.5 (allowed: 0 <= value < 1)"),
        ("sae.a.epochs=0", "invalid sae.a.epochs: 0 (allowed: a positive integer)"),
        ("data.dataset=/no/such/dir", "data.dataset directory /no/such/dir does not exist"),
        ("data.dataset=data/tiny/no-such-dir", "data.dataset directory data/tiny/no-such-dir does not exist"),
    ],
)
def test_bad_values_are_one_line(tiny_params, override, message):
    one_line_error(invoke("extract", "--params", str(tiny_params), "-S", override), message)


def test_a_string_override_is_taken_as_typed_and_a_yaml_mapping_says_how_to_quote(tmp_path):
    path = PROJECT_ROOT / "params.yaml"
    typed = load_params(path, ["data.template={text}", 'data.config="{x}"', "model.revision=null"])
    assert (typed.data.template, typed.data.config, typed.model.revision) == ("{text}", "{x}", None)
    assert load_params(path, ["sae.a.lr=5e-5"]).sae["a"].lr == 5e-5  # other types still read as YAML
    unquoted = write_params(tmp_path / "params.yaml", data={"template": {"text": None}})  # template: {text}
    with pytest.raises(PipelineError, match=r"data.template must be a string.*quote the value.*template: \"\{text\}\""):
        load_params(unquoted)


def test_an_empty_split_file_is_one_line(tmp_path, tiny_params, gsm_dir):
    data = tmp_path / "gsm"
    shutil.copytree(gsm_dir, data)
    (data / "test.jsonl").write_text("\n")
    one_line_error(invoke("extract", "--params", str(tiny_params), "-S", f"data.dataset={data}"), "holds no rows")


# 8-11. First contact.


def test_an_up_to_date_store_is_left_alone_unless_forced(extracted, monkeypatch):
    params, store = extracted
    stamps = {p: p.stat().st_mtime_ns for p in store.rglob("*")}
    from pipeline.extract.shards import ShardExtractor

    calls = {"n": 0}
    original = ShardExtractor.extract

    def counted(self, *args):
        calls["n"] += 1
        return original(self, *args)

    monkeypatch.setattr(ShardExtractor, "extract", counted)
    result = invoke("extract", "--params", str(params))
    assert result.exit_code == 0 and "is up to date" in result.output
    assert calls["n"] == 0 and stamps == {p: p.stat().st_mtime_ns for p in store.rglob("*")}
    assert invoke("extract", "--params", str(params), "--force").exit_code == 0
    assert calls["n"] > 0
    calls["n"] = 0
    result = invoke("extract", "--params", str(params), "-S", "extract.hooks=[blocks.0.hook_resid_post]")
    assert result.exit_code == 0 and "will be replaced" in result.output and "hooks" in result.output
    assert calls["n"] > 0 and ActivationStore(store).hooks == ["blocks.0.hook_resid_post"]


def test_resume_with_nothing_to_resume_says_so(tmp_path):
    params = synthetic_params(tmp_path, n_train=2000)
    result = invoke("train", "--config", "a", "--params", str(params), "--resume")
    assert result.exit_code == 0
    assert "--resume: no checkpoint of config_a_2x" in result.output and "trains from the start" in result.output


def test_parameter_errors_answer_before_torch_is_imported():
    done = run_python("""
        import sys
        from pipeline.cli import app
        try:
            app(["extract", "-S", "extract.nonsense=1"])
        except SystemExit as exit:
            print(exit.code, "torch" in sys.modules, "transformer_lens" in sys.modules)
    """)
    assert done.stdout.split() == ["2", "False", "False"], done.stderr
    assert "unknown parameter 'extract.nonsense'" in done.stderr


def test_short_help_and_config_keys_in_help():
    result = invoke("train", "-h")
    assert result.exit_code == 0 and "Usage" in result.output
    assert "a, b, c" in result.output  # the keys of ./params.yaml's `sae` section


def test_evaluate_shows_progress(tmp_path, extracted):
    params, _ = extracted
    small = ["-S", "train.seq_len=8", "-S", "sae.a.epochs=1"]
    assert invoke("train", "--params", str(params), *small, "--config", "a").exit_code == 0
    result = invoke("evaluate", "--params", str(params), *small, "--config", "a")
    assert result.exit_code == 0, result.output
    assert "splice" in result.stderr and "reconstruction" in result.stderr and "tok/s" in result.stderr


def test_progress_rate_over_busy_time_matches_the_metrics_definition():
    from rich.progress import Progress

    from pipeline.core.progress import ProgressBar, Throughput

    progress = Progress()
    bar = ProgressBar(progress, "a", total=10_000, unit="tok")
    bar.advance(4_000)  # e.g. resumed tokens: no time of this run
    bar.advance(3_000, seconds=1.5)
    bar.advance(1_000, seconds=0.5)
    assert str(Throughput().render(progress.tasks[0])) == "2.0K tok/s"  # 4,000 tokens in 2.0 s of own steps
    slow = ProgressBar(progress, "b", total=10, unit="step")
    slow.advance(1, seconds=4.0)  # under one unit a second (a crash of the bars' thread once)
    assert str(Throughput().render(progress.tasks[1])) == "0.2 step/s"


def test_stores_are_read_without_zarr_warnings(extracted, recwarn):
    _, store = extracted
    group = zarr.open_group(store, mode="r")
    assert sorted(group["train"].array_keys()) == ["blocks.1.hook_resid_post", "blocks.1.hook_resid_pre",
                                                   "doc_offsets", "tokens"]  # fmt: skip
    assert not [w for w in recwarn if "zarr" in str(w.category).lower()]
    assert np.isfinite(ActivationStore(store).read_rows("train", "blocks.1.hook_resid_post", 0, 10)).all()


# 12. An extraction interrupted anywhere resumes to the store an uninterrupted run writes.

CREATE_ARRAY_CALLS = 8  # a fresh two-split, two-hook extraction: tokens, doc_offsets and a hook array, twice, per split


def store_contents(store: str | Path) -> dict:
    """What must be identical between two stores of the same parameters: every file's checksum, and the
    attributes but the command line that wrote them."""
    attrs = ActivationStore(store).attrs
    return {"files": attrs.pop("manifest")["files"], "attrs": {k: v for k, v in attrs.items() if k != "command"}}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir, gsm_dir) -> dict:
    root = tmp_path_factory.mktemp("uninterrupted")
    params = write_params(
        root / "params.yaml", model={"name": str(tiny_model_dir), "device": "cpu"}, data={"dataset": str(gsm_dir)},
        extract={"hooks": ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"], "store": str(root / "store"),
                 "batch_tokens": 2048, "shard_tokens": 2048, "chunk_tokens": 512},
    )  # fmt: skip
    assert invoke("extract", "--params", str(params)).exit_code == 0
    return store_contents(root / "store")


def interrupt_creating_array(call: int, half: bool) -> Callable:
    """A replacement for zarr's create_array that stops the run at its `call`-th call: before that array exists,
    or (`half`) once its metadata is written but none of its data."""
    real = zarr.Group.create_array
    calls = {"n": 0}

    def create_array(self, name, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            if half:
                data = kwargs.pop("data", None)
                real(self, name, **kwargs, **({} if data is None else {"shape": data.shape, "dtype": data.dtype}))
            raise KeyboardInterrupt
        return real(self, name, **kwargs)

    return create_array


@pytest.mark.parametrize("half", [False, True], ids=["before", "halfway"])
@pytest.mark.parametrize("call", range(1, CREATE_ARRAY_CALLS + 1))
def test_an_extraction_stopped_while_creating_arrays_resumes_to_the_same_store(
    tiny_params, uninterrupted, monkeypatch, call, half
):
    with monkeypatch.context() as patch:
        patch.setattr(zarr.Group, "create_array", interrupt_creating_array(call, half))
        assert invoke("extract", "--params", str(tiny_params)).exit_code == 130
    result = invoke("extract", "--resume", "--params", str(tiny_params))
    assert result.exit_code == 0, result.output
    assert store_contents(store_of(tiny_params)) == uninterrupted


def test_an_extraction_killed_while_creating_arrays_resumes(tiny_params, uninterrupted):
    """The same with a real SIGKILL: the second split's token ids are half-created when the process dies."""
    killed = run_python(f"""
        import os, signal
        import zarr
        real = zarr.Group.create_array
        calls = []

        def create_array(self, name, **kwargs):
            calls.append(name)
            if len(calls) == 5:  # the test split's tokens: metadata written, data not
                data = kwargs.pop("data")
                real(self, name, shape=data.shape, dtype=data.dtype, **kwargs)
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, name, **kwargs)

        zarr.Group.create_array = create_array
        from pipeline.cli import app
        app(["extract", "--params", {str(tiny_params)!r}])
    """)
    assert killed.returncode == -9, killed.stderr
    result = invoke("extract", "--resume", "--params", str(tiny_params))
    assert result.exit_code == 0, result.output
    assert store_contents(store_of(tiny_params)) == uninterrupted
