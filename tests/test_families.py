"""Model families besides GPT-2 (Pythia's GPT-NeoX, Llama, Qwen2, Gemma 2), each a tiny random checkpoint: the
stored activations are the checkpoint's own hidden states, and the logit effects go through its own final norm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import invoke, write_params
from transformers import AutoModelForCausalLM

from pipeline.analyze.logits import direct_logits, vocabulary_of
from pipeline.model import load_model
from pipeline.params import ModelConfig, load_params
from pipeline.store import ActivationStore
from pipeline.tiny import FAMILIES, make_rows, save_tiny_family, train_tokenizer

HOOK = "blocks.1.hook_resid_post"  # the residual stream after block 1: hidden_states[2] in transformers


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([r["question"] + "\n" + r["answer"] for r in make_rows(200, seed=3)])


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory, tokenizer) -> tuple[str, object]:
    family = request.param
    if family == "qwen2":  # Qwen2's tokenizers have no BOS token: data.bos auto starts documents with EOS
        tokenizer = type(tokenizer)(tokenizer_object=tokenizer.backend_tokenizer, eos_token=tokenizer.eos_token)
        assert tokenizer.bos_token_id is None
    return family, save_tiny_family(tmp_path_factory.mktemp(family), tokenizer, family)


def test_stored_activations_are_the_checkpoint_s_hidden_states(family_dir, tmp_path, gsm_dir):
    family, directory = family_dir
    params = write_params(
        tmp_path / "params.yaml",
        model={"name": str(directory), "device": "cpu"},
        data={"dataset": str(gsm_dir), "max_docs": 12},
        extract={"hooks": [HOOK], "store": str(tmp_path / "store"), "dtype": "float32", "batch_tokens": 1024},
    )
    result = invoke("extract", "--params", str(params))
    assert result.exit_code == 0, result.output
    store = ActivationStore(load_params(params).extract.store)
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    start = model.config.eos_token_id if family == "qwen2" else model.config.bos_token_id
    assert store.attrs["bos_token_id"] == start
    assert ("EOS" in store.attrs["bos_policy"]) == (family == "qwen2")
    tokens, offsets = store.tokens("test"), store.doc_offsets("test")
    stored = store.activations("test", HOOK)[:]
    for doc in range(len(offsets) - 1):
        ids = torch.from_numpy(tokens[offsets[doc] : offsets[doc + 1]].astype(np.int64))[None]
        assert ids[0, 0] == start
        with torch.no_grad():
            expected = model(ids, output_hidden_states=True).hidden_states[2][0]
        torch.testing.assert_close(torch.from_numpy(stored[offsets[doc] : offsets[doc + 1]]), expected,
                                   rtol=1e-4, atol=1e-5)  # fmt: skip


def test_logit_effects_go_through_the_checkpoint_s_own_final_norm(family_dir):
    family, directory = family_dir
    vocabulary = vocabulary_of(load_model(ModelConfig(name=str(directory), device="cpu")), torch.device("cpu"))
    assert vocabulary.centred == (family == "gpt_neox")  # LayerNorm centres; RMSNorm does not
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    norm = model.get_decoder().final_layer_norm if family == "gpt_neox" else model.get_decoder().norm
    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(16, 64, generator=generator) + 0.5  # a mean of its own, for centring to matter
    with torch.no_grad():
        # lm_head(norm(d)) - lm_head(norm(-d)): the bias cancels, and what is left is the effect times 2 / |d|_norm
        theirs = (model.lm_head(norm(directions)) - model.lm_head(norm(-directions))) / 2
    ours = direct_logits(directions, vocabulary)
    cosine = torch.nn.functional.cosine_similarity(ours, theirs, dim=1)
    assert cosine.min() > 0.99999, family
    assert torch.equal(ours.topk(5, dim=1).indices, theirs.topk(5, dim=1).indices)
