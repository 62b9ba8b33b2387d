"""The extract stage: exact activations, no padding stored, atomic writes, resume, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import interrupt_extraction_after, invoke, write_jsonl, write_params

from pipeline.core.location import partial_path
from pipeline.corpus import load_documents
from pipeline.model import capture, check_hooks, load_model
from pipeline.params import ModelConfig, load_params
from pipeline.store import ActivationStore

HOOKS = ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"]


def reference_activations(model, doc_tokens: np.ndarray, hook: str) -> torch.Tensor:
    """A single-document forward pass through the whole model, no batching, no early stop."""
    with torch.inference_mode():
        _, cache = model.run_with_cache(torch.from_numpy(doc_tokens.astype(np.int64))[None])
    return cache[hook][0].float()


@pytest.mark.parametrize(
    ("batch_tokens", "hooks"),
    [
        (256, HOOKS),
        (4096, HOOKS),
        (1024, ["blocks.0.hook_resid_pre", "blocks.3.hook_resid_post"]),  # the last layer: no early stop
    ],
)
def test_activations_equal_single_document_forward(tiny_params, tiny_model_dir, batch_tokens, hooks):
    result = invoke(
        "extract", "--params", str(tiny_params), "-S", f"extract.batch_tokens={batch_tokens}",
        "-S", f"extract.hooks=[{', '.join(hooks)}]",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    params = load_params(tiny_params)
    store = ActivationStore(params.extract.store)
    model = load_model(ModelConfig(name=str(tiny_model_dir), device="cpu"))
    for split in ("train", "test"):
        tokens, offsets = store.tokens(split), store.doc_offsets(split)
        for hook in hooks:
            stored = torch.from_numpy(store.activations(split, hook)[:].astype(np.float32))
            assert stored.shape == (len(tokens), model.cfg.d_model)
            for doc in range(0, len(offsets) - 1, 7):
                lo, hi = offsets[doc], offsets[doc + 1]
                expected = reference_activations(model, tokens[lo:hi], hook)
                # Within float16 rounding (relative 2^-11) of the fp32 reference, nothing more.
                torch.testing.assert_close(stored[lo:hi], expected, rtol=2**-10, atol=1e-5)


def test_tokens_match_independent_tokenization_without_padding(tiny_params, tiny_model_dir):
    assert invoke("extract", "--params", str(tiny_params)).exit_code == 0
    params = load_params(tiny_params)
    store = ActivationStore(params.extract.store)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for split in ("train", "test"):
        docs = load_documents(params.data, split)
        expected = [[tokenizer.bos_token_id, *tokenizer.encode(d, add_special_tokens=False)] for d in docs]
        offsets = store.doc_offsets(split)
        assert len(offsets) == len(docs) + 1
        assert np.array_equal(np.diff(offsets), [len(e) for e in expected])
        assert np.array_equal(store.tokens(split), np.concatenate(expected))
        assert store.activations(split, HOOKS[0]).shape[0] == offsets[-1]  # no padding positions
        assert store.attrs["split_stats"][split]["n_tokens"] == offsets[-1]
        assert store.attrs["split_stats"][split]["n_truncated_docs"] == 0


def test_long_documents_are_truncated_and_counted(tmp_path, tiny_params, gsm_dir):
    result = invoke("extract", "--params", str(tiny_params), "-S", "data.max_docs=10")
    assert result.exit_code == 0
    store = ActivationStore(load_params(tiny_params).extract.store)
    lengths = np.diff(store.doc_offsets("train"))
    assert len(lengths) == 10
    # The tiny model's context is 256 tokens; make one split whose documents exceed it.
    long_rows = [{"question": "x " * 400, "answer": "#### 1"}, {"question": "short", "answer": "#### 2"}]
    write_jsonl(tmp_path / "long" / "train.jsonl", long_rows)
    result = invoke(
        "extract", "--params", str(tiny_params), "-S", f"data.dataset={tmp_path / 'long'}", "-S", "data.splits=[train]"
    )
    assert result.exit_code == 0, result.output
    store = ActivationStore(load_params(tiny_params).extract.store)
    assert next(iter(np.diff(store.doc_offsets("train")))) == 256
    assert store.attrs["split_stats"]["train"]["n_truncated_docs"] == 1


def test_model_stops_after_the_deepest_hook(tiny_model_dir):
    model = load_model(ModelConfig(name=str(tiny_model_dir), device="cpu"))
    stop = check_hooks(model, ["blocks.1.hook_resid_post", "blocks.0.hook_resid_pre"])
    assert stop == 2
    ran = []
    handles = [b.register_forward_hook(lambda m, i, o, k=k: ran.append(k)) for k, b in enumerate(model.blocks)]
    tokens = torch.tensor([[model.tokenizer.bos_token_id, 5, 6, 7]])
    out = capture(model, tokens, torch.ones_like(tokens), ["blocks.1.hook_resid_post"], stop)
    for h in handles:
        h.remove()
    assert ran == [0, 1]
    assert out["blocks.1.hook_resid_post"].shape == (1, 4, 64)


def read_all(path) -> dict[str, np.ndarray]:
    group = zarr.open_group(path, mode="r")
    return {f"{s}/{n}": group[s][n][:] for s in group.group_keys() for n in group[s].array_keys()}


def test_interrupted_extraction_resumes_to_an_identical_store(tmp_path, tiny_params, monkeypatch):
    reference_params = write_params(tmp_path / "ref.yaml", **_sections(tiny_params, store=tmp_path / "ref"))
    assert invoke("extract", "--params", str(reference_params)).exit_code == 0

    calls = interrupt_extraction_after(3, monkeypatch)
    result = invoke("extract", "--params", str(tiny_params))
    assert result.exit_code == 130
    store_path = tmp_path / "activations"
    assert not store_path.exists() and partial_path(store_path).is_dir()  # nothing under the final name
    done = json.loads((partial_path(store_path) / "progress.json").read_text())["shards"]
    assert sum(len(v) for v in done.values()) == 3

    calls["n"] = -1000  # no more interruptions; count the shards computed on resume
    result = invoke("extract", "--params", str(tiny_params), "--resume")
    assert result.exit_code == 0, result.output
    reference, resumed = read_all(tmp_path / "ref"), read_all(store_path)
    n_shards = sum(-(-len(reference[f"{s}/tokens"]) // 2048) for s in ("train", "test"))
    assert calls["n"] + 1000 == n_shards - 3  # nothing already written was recomputed
    assert reference.keys() == resumed.keys()
    for key in reference:
        assert np.array_equal(reference[key], resumed[key]), key
    assert not partial_path(store_path).exists()


def _sections(params_path, store) -> dict:
    params = load_params(params_path)
    return {
        "model": {"name": params.model.name, "device": "cpu"},
        "data": {"dataset": params.data.dataset},
        "extract": {**vars(params.extract), "store": str(store)},
    }


def test_resume_refuses_different_parameters(tiny_params, monkeypatch):
    from pipeline.extract.shards import ShardExtractor

    monkeypatch.setattr(ShardExtractor, "extract", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    assert invoke("extract", "--params", str(tiny_params)).exit_code == 130
    monkeypatch.undo()
    result = invoke(
        "extract", "--params", str(tiny_params), "--resume", "-S", "extract.hooks=[blocks.0.hook_resid_pre]"
    )
    assert result.exit_code == 2
    assert "different parameters" in result.stderr and "hooks" in result.stderr


def test_disk_error_mid_write_leaves_no_store_under_the_final_name(tiny_params, monkeypatch):
    from pipeline.store.writer import StoreWriter

    writes = {"n": 0}
    original = StoreWriter.write_shard

    def failing(self, *args):
        writes["n"] += 1
        if writes["n"] == 2:
            raise OSError(28, "No space left on device")
        return original(self, *args)

    monkeypatch.setattr(StoreWriter, "write_shard", failing)
    result = invoke("extract", "--params", str(tiny_params))
    assert result.exit_code == 2
    assert "No space left on device" in result.stderr
    store = Path(load_params(tiny_params).extract.store)
    assert not store.exists() and partial_path(store).is_dir()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("extract.hooks=[blocks.1.hook_nonsense]", "unknown hook 'blocks.1.hook_nonsense'; valid hooks"),
        ("extract.hooks=[blocks.9.hook_resid_pre]", "layer 9 is beyond the model's 4 layers"),
        ("model.name=/nonexistent/model", "model.name directory /nonexistent/model does not exist"),
        ("data.splits=[validation]", "split 'validation': no validation.jsonl"),
        ("extract.nonsense=1", "unknown parameter 'extract.nonsense'"),
        ("extract.batch_tokens=many", "extract.batch_tokens must be int"),
        ("data.max_docs=0", "invalid data.max_docs"),
        ("extract.store=s3://bucket", "a URL with a prefix below the bucket"),
    ],
)
def test_bad_input_is_one_clear_line(tiny_params, override, message):
    result = invoke("extract", "--params", str(tiny_params), "-S", override)
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.name=openai-community/no-such-model", "Point model.name at a local directory"),
        ("data.dataset=openai/no-such-dataset", "Point data.dataset at a local directory"),
    ],
)
def test_offline_hub_ids_say_how_to_use_a_local_copy(tiny_params, monkeypatch, override, message):
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # The libraries read those variables when first imported, which earlier tests may have done: set what they read.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    result = invoke("extract", "--params", str(tiny_params), "-S", override)
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_malformed_jsonl_names_file_and_line(tmp_path, tiny_params, gsm_dir):
    bad = tmp_path / "bad"
    bad.mkdir()
    lines = (gsm_dir / "train.jsonl").read_text().splitlines()
    (bad / "train.jsonl").write_text("\n".join([lines[0], lines[1], '{"question": "no answer"', *lines[2:]]))
    (bad / "test.jsonl").write_text((gsm_dir / "test.jsonl").read_text())
    result = invoke("extract", "--params", str(tiny_params), "-S", f"data.dataset={bad}")
    assert result.exit_code == 2
    assert f"{bad / 'train.jsonl'}:3: not valid JSON" in result.stderr


def test_output_path_that_is_a_file_is_refused(tmp_path, tiny_params):
    target = tmp_path / "a_file"
    target.write_text("precious")
    result = invoke("extract", "--params", str(tiny_params), "-S", f"extract.store={target}")
    assert result.exit_code == 2
    assert "is a file" in result.stderr
    assert target.read_text() == "precious"


def test_real_gsm8k_test_split_token_counts(tmp_path, real_data, gpt2_tokenizer_model_dir):
    """On the real GSM8K test split with the real GPT-2 tokenizer, counts match tiktoken's tokenization."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    from pipeline.tiny import GPT2_SPLIT_PATTERN

    params = write_params(
        tmp_path / "params.yaml",
        model={"name": str(gpt2_tokenizer_model_dir), "device": "cpu"},
        data={"dataset": str(real_data / "gsm8k"), "splits": ["test"]},
        extract={"hooks": ["blocks.0.hook_resid_post"], "store": str(tmp_path / "store")},
    )
    result = invoke("extract", "--params", str(params))
    assert result.exit_code == 0, result.output
    store = ActivationStore(tmp_path / "store")
    encoding = tiktoken.Encoding(
        "gpt2",
        pat_str=GPT2_SPLIT_PATTERN,
        mergeable_ranks=load_tiktoken_bpe(str(real_data / "gpt2-tokenizer" / "gpt2.tiktoken")),
        special_tokens={"<|endoftext|>": 50256},
    )
    rows = [json.loads(line) for line in (real_data / "gsm8k" / "test.jsonl").read_text().splitlines()]
    expected = [[50256, *encoding.encode_ordinary(r["question"] + "\n" + r["answer"])] for r in rows]
    assert len(rows) == 1319
    assert np.array_equal(np.diff(store.doc_offsets("test")), [len(e) for e in expected])
    assert np.array_equal(store.tokens("test"), np.concatenate(expected))
    assert store.activations("test", "blocks.0.hook_resid_post").shape == (sum(map(len, expected)), 64)


def test_models_are_shared_within_pipeline_run_and_loaded_afresh_elsewhere(tiny_model_dir):
    """`pipeline run` loads its model once for extraction, evaluation and analysis; any other load reads the
    checkpoint again (it may have changed on disk)."""
    from pipeline.model import sharing_models

    cfg = ModelConfig(name=str(tiny_model_dir), device="cpu")
    with sharing_models():
        assert load_model(cfg) is load_model(cfg)
    assert load_model(cfg) is not load_model(cfg)
