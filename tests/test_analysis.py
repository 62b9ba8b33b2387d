"""The analyze stage's streaming computations equal their dense definitions, and the logit effects equal a
computation from the `transformers` checkpoint's own weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.analyze.features import ACTIVATION_SCALE, analyze
from pipeline.analyze.logits import logit_effects, vocabulary_of
from pipeline.analyze.statistics import histograms_and_quantile_samples, latent_statistics
from pipeline.params import AnalyzeConfig
from pipeline.saes.relu import ReLUSAE
from pipeline.store import ActivationStore
from pipeline.store.writer import StoreWriter
from pipeline.train.loader import ActivationLoader

D_IN, D_SAE, N = 16, 48, 600
SETTINGS = AnalyzeConfig(top_n=5, quantiles=4, per_quantile=3, window=3, histogram_bins=8, batch_tokens=37)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return make_case(tmp_path_factory.mktemp("analysis"))


def make_case(root: Path, device: str = "cpu", memory_budget_gb: float = 8.0):
    """A random SAE whose encoder biases range from 0 to very negative (busy, rare and dead latents); a store of
    random activations in documents of 10..30 tokens, read through the training loader (every token but each
    BOS); and what the streaming passes must reproduce."""
    generator = torch.Generator().manual_seed(0)
    sae = ReLUSAE(D_IN, D_SAE, "unit", generator=generator)  # unit rows: pre-activations of order 1 against b_enc
    with torch.no_grad():
        sae.b_enc.copy_(torch.linspace(0, -4, D_SAE))
    data = torch.randn(N, D_IN, generator=generator)
    lengths = np.random.default_rng(0).integers(10, 30, size=40)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    offsets = offsets[offsets < N]
    offsets = np.append(offsets, N)
    tokens = np.random.default_rng(1).integers(0, 100, size=N).astype(np.int32)
    store = root / "store"
    if not store.exists():
        attrs = {"hooks": ["h"], "d_model": D_IN, "dtype": "float32", "shard_tokens": 128, "chunk_tokens": 32,
                 "splits": ["test"], "model": "m", "dataset": "d", "n_ctx": 64, "bos_token_id": 0}  # fmt: skip
        writer = StoreWriter(store, attrs, resume=False)
        writer.add_split("test", tokens, offsets)
        for index, start, end in writer.pending_shards("test"):
            writer.write_shard("test", index, start, {"h": data[start:end].numpy()})
        writer.finalize({})
    loader = ActivationLoader(ActivationStore(store), "test", "h", torch.device(device), 0, True, memory_budget_gb)
    positions = torch.from_numpy(np.setdiff1d(np.arange(N), offsets[:-1]))  # every token but each BOS
    with torch.no_grad():
        dense = sae.encode(data[positions])  # [positions, d_sae]: what the streaming passes must reproduce
    return sae.to(device), loader, data, positions, tokens, offsets, dense


def test_statistics_and_top_contexts_equal_the_dense_computation(case):
    sae, loader, _, positions, _, _, dense = case
    stats = latent_statistics(loader, sae, SETTINGS)
    assert torch.equal(stats.counts, (dense > 0).sum(0))
    torch.testing.assert_close(stats.sums, dense.sum(0).double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.maxima, dense.max(0).values.clamp(min=0))
    expected_values, expected_rows = dense.T.topk(SETTINGS.top_n, dim=1)
    torch.testing.assert_close(stats.top_values, expected_values.clamp(min=0))
    fired = expected_values > 0
    assert torch.equal(stats.top_tokens[fired], positions[expected_rows][fired])
    assert (stats.top_tokens[~fired] == -1).all()
    assert fired.any() and (~fired).any()  # the case has both busy and rarely-firing latents


def test_histograms_and_quantile_samples_follow_their_definitions(case):
    sae, loader, _, positions, _, _, dense = case
    maxima = dense.max(0).values.clamp(min=1e-30)
    histograms, samples, in_interval = histograms_and_quantile_samples(loader, sae, maxima, SETTINGS, seed=0)
    q, k = SETTINGS.quantiles, SETTINGS.per_quantile
    activation_at = {int(p): i for i, p in enumerate(positions)}
    for j in range(D_SAE):
        fired = dense[:, j][dense[:, j] > 0]
        expected = torch.histc(fired / maxima[j], bins=SETTINGS.histogram_bins, min=0, max=1)
        assert histograms[j].tolist() == expected.long().tolist()
        interval = (fired / maxima[j] * q).long().clamp(max=q - 1)
        assert in_interval[j].tolist() == [int((interval == quantile).sum()) for quantile in range(q)]
        for quantile in range(q):
            chosen = [int(t) for t in samples[j, quantile] if t >= 0]
            assert len(chosen) == min(k, int((interval == quantile).sum())), (j, quantile)
            assert len(set(chosen)) == len(chosen)
            for token in chosen:
                relative = dense[activation_at[token], j] / maxima[j]
                assert quantile / q <= relative <= (quantile + 1) / q + 1e-6
    _, other_seed, _ = histograms_and_quantile_samples(loader, sae, maxima, SETTINGS, seed=1)
    _, same_seed, _ = histograms_and_quantile_samples(loader, sae, maxima, SETTINGS, seed=0)
    assert torch.equal(samples, same_seed) and not torch.equal(samples, other_seed)


def test_context_windows_hold_the_latents_own_activations(case):
    sae, loader, data, positions, tokens, offsets, _ = case
    result = analyze(sae, loader, tokens, offsets, SETTINGS, seed=0, vocabulary=None)
    assert len(result["features"]) == D_SAE and result["n_tokens"] == len(positions)
    with torch.no_grad():
        every_token = sae.encode(data)  # BOS tokens too: they may sit in a context window
    checked = 0
    for feature in result["features"]:
        j, maximum = feature["id"], feature["max"]
        examples = feature["top"] + [e for q in feature["quantiles"] for e in q["examples"]]
        for doc, position, at, ids, acts in examples:
            centre = offsets[doc] + position
            lo = centre - at
            assert offsets[doc] <= lo and lo + len(ids) <= offsets[doc + 1]  # never crosses a document
            assert len(ids) <= 2 * SETTINGS.window + 1 and ids == tokens[lo : lo + len(ids)].tolist()
            expected = torch.round(every_token[lo : lo + len(ids), j] / maximum * ACTIVATION_SCALE)
            assert acts == expected.long().tolist()
            checked += 1
        if feature["top"]:
            assert max(feature["top"][0][4]) == ACTIVATION_SCALE  # the top example holds the maximum
    assert checked > D_SAE


def test_a_split_streamed_within_a_small_budget_gives_the_same_analysis(case, tmp_path_factory):
    """Out of core (a budget of a few chunks: the split is never in memory whole) the passes see the same tokens
    in the same blocks, so the browser's data is the same, sampled examples included."""
    sae, loader, *_, tokens, offsets, _ = case
    streamed = make_case(loader.store.location.path.parent, memory_budget_gb=3 * 2 * 32 * D_IN * 4 / 2**30)[1]
    assert loader.resident_on_device and not streamed.resident_on_device
    assert analyze(sae, streamed, tokens, offsets, SETTINGS, 0, None) == analyze(sae, loader, tokens, offsets,
                                                                                 SETTINGS, 0, None)  # fmt: skip


def test_logit_effects_equal_the_checkpoints_own_weights(tiny_model_dir):
    from transformers import GPT2LMHeadModel

    from pipeline.model import load_model
    from pipeline.params import ModelConfig

    vocabulary = vocabulary_of(load_model(ModelConfig(name=str(tiny_model_dir), device="cpu")), torch.device("cpu"))
    reference = GPT2LMHeadModel.from_pretrained(tiny_model_dir)
    d_model = reference.config.n_embd
    sae = ReLUSAE(d_model, 32, generator=torch.Generator().manual_seed(0))
    direction = sae.W_dec.detach() - sae.W_dec.detach().mean(dim=1, keepdim=True)
    with torch.no_grad():
        expected = (direction * reference.transformer.ln_f.weight) @ reference.lm_head.weight.T
    top_values, top_ids, bottom_values, bottom_ids = logit_effects(sae, vocabulary, 5)
    want_top, want_bottom = expected.topk(5, dim=1), expected.topk(5, dim=1, largest=False)
    torch.testing.assert_close(top_values, want_top.values, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bottom_values, want_bottom.values, rtol=1e-4, atol=1e-5)
    assert torch.equal(top_ids, want_top.indices) and torch.equal(bottom_ids, want_bottom.indices)
    assert vocabulary.decode(int(top_ids[0, 0])) == reference_decode(tiny_model_dir, int(top_ids[0, 0]))


def reference_decode(model_dir, token: int) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir).decode([token])
