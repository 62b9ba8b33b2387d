"""The CUDA paths, against their CPU counterparts: they run where a GPU is present (`bench/device-check.sh`)
and skip elsewhere, so a CPU-only CI reports them as skipped rather than passed."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import invoke, write_synthetic_store
from test_analysis import SETTINGS, make_case
from test_architectures import PLANTED, train_planted
from test_extract import reference_activations
from test_train import recovery_and_explained_variance

from pipeline.analyze.features import analyze
from pipeline.model import load_model
from pipeline.params import ModelConfig, load_params
from pipeline.store import ActivationStore
from pipeline.train.loader import ActivationLoader

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted-cuda")
    dictionary = write_synthetic_store(root / "store", n_train=20_000, n_test=2_000, d=32, n_dirs=64, p_active=0.04)
    return root / "store", dictionary


@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 1e-4), ("float16", 2e-2)])
def test_cuda_extraction_equals_a_cpu_forward(tiny_params, tiny_model_dir, dtype, tolerance):
    """Stored in float32, so the only difference left is the model's arithmetic on the GPU in `dtype`."""
    result = invoke(
        "extract", "--params", str(tiny_params), "-S", "model.device=cuda", "-S", f"model.dtype={dtype}",
        "-S", "extract.dtype=float32",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    store = ActivationStore(load_params(tiny_params).extract.store)
    model = load_model(ModelConfig(name=str(tiny_model_dir), device="cpu"))
    tokens, offsets = store.tokens("test"), store.doc_offsets("test")
    stored = torch.from_numpy(store.activations("test", HOOK)[:].astype(np.float32))
    for doc in range(0, len(offsets) - 1, 5):
        lo, hi = offsets[doc], offsets[doc + 1]
        expected = reference_activations(model, tokens[lo:hi], HOOK)
        error = (stored[lo:hi] - expected).norm() / expected.norm()
        assert error < tolerance, (doc, error.item())


@pytest.mark.parametrize("budget_gb", [8.0, 0.001], ids=["on-device", "pinned-streamed"])
def test_cuda_loader_gives_the_cpu_loader_blocks(tmp_path, budget_gb):
    write_synthetic_store(tmp_path / "store", n_train=20_000, n_test=1_000, d=32, n_dirs=64)
    store = ActivationStore(tmp_path / "store")
    cpu = ActivationLoader(store, "train", "synthetic", torch.device("cpu"), seed=3, memory_budget_gb=budget_gb)
    cuda = ActivationLoader(store, "train", "synthetic", CUDA, seed=3, memory_budget_gb=budget_gb)
    assert cuda.resident_on_device == (budget_gb > 1)
    for a, b in zip(cpu.epoch(1, 3000), cuda.epoch(1, 3000), strict=True):
        assert b.device.type == "cuda"
        assert torch.equal(a, b.cpu())


@pytest.mark.parametrize("architecture", list(PLANTED))
def test_fp16_autocast_training_on_cuda_recovers_a_planted_dictionary(tmp_path, planted, architecture):
    """The CUDA default: fp16 autocast with a GradScaler; each architecture must still learn the dictionary."""
    store, dictionary = planted
    folder = train_planted(tmp_path, store, architecture, device="cuda", amp="auto")
    metrics = json.loads((tmp_path / "artifacts/details/train_s.json").read_text())
    assert metrics["amp"] == "float16"
    assert math.isfinite(metrics["final_step"]["loss"])
    recovered, explained = recovery_and_explained_variance(folder, store, dictionary)
    assert recovered >= PLANTED[architecture][1], recovered
    assert explained >= 0.8


def test_cuda_evaluation_agrees_with_cpu(tmp_path, tiny_params):
    """Splice scores and reconstruction on CUDA match the CPU's for the same SAEs and tokens."""
    base = ["--params", str(tiny_params), "-S", "train.seq_len=8", "-S", "sae.a.epochs=1", "-S", "sae.b.epochs=1",
            "-S", "sae.c.epochs=1"]  # fmt: skip
    for command in ("extract", "train"):
        result = invoke(command, *base)
        assert result.exit_code == 0, result.output
    details = {}
    for device in ("cpu", "cuda"):
        result = invoke("evaluate", *base, "-S", f"train.device={device}", "-S", f"model.device={device}",
                        "-S", "model.dtype=float32")  # fmt: skip
        assert result.exit_code == 0, result.output
        details[device] = json.loads((tmp_path / "artifacts/details/eval_a.json").read_text())
    for section, key in [("reconstruction", "explained_variance"), ("reconstruction", "l0"),
                         ("splice", "ce_clean"), ("splice", "ce_sae"), ("splice", "kl_sae")]:  # fmt: skip
        cpu, cuda = details["cpu"][section][key], details["cuda"][section][key]
        assert cuda == pytest.approx(cpu, rel=1e-3, abs=1e-4), (section, key)


@pytest.mark.parametrize("memory_budget_gb", [8.0, 1e-5], ids=["resident", "streamed"])
def test_cuda_analysis_equals_cpu(tmp_path, memory_budget_gb):
    """Statistics, top contexts and histograms on CUDA are the CPU's (quantile samples use each device's own
    random stream, so they are compared only by count), with the split on the GPU or streamed to it."""
    sae, loader, *_, tokens, offsets, _ = make_case(tmp_path)
    cpu = analyze(sae, loader, tokens, offsets, SETTINGS, seed=0, vocabulary=None)
    sae, loader, *_ = make_case(tmp_path, device="cuda", memory_budget_gb=memory_budget_gb)
    cuda = analyze(sae, loader, tokens, offsets, SETTINGS, seed=0, vocabulary=None)
    for a, b in zip(cpu["features"], cuda["features"], strict=True):
        assert a["frequency"] == b["frequency"] and a["histogram"] == b["histogram"]
        assert b["max"] == pytest.approx(a["max"], rel=1e-5) and b["mean"] == pytest.approx(a["mean"], rel=1e-5)
        assert [e[:4] for e in a["top"]] == [e[:4] for e in b["top"]]
        assert [len(q["examples"]) for q in a["quantiles"]] == [len(q["examples"]) for q in b["quantiles"]]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_fused_attention_on_cuda_equals_the_bridge_s_own(tiny_model_dir, dtype):
    """SDPA's CUDA kernels (not the CPU's) against TransformerLens's attention on the same GPU, padded batches."""
    from test_attention import padded_batch

    ids, mask = (t.to(CUDA) for t in padded_batch())
    fused, eager = (load_model(ModelConfig(name=str(tiny_model_dir), device="cuda", dtype=dtype,
                                           attn_implementation=a)) for a in ("sdpa", "eager"))  # fmt: skip
    with torch.inference_mode():
        out, own = fused(ids, attention_mask=mask), eager(ids, attention_mask=mask)
    real = mask.bool()
    error = (out[real] - own[real]).float().norm() / own[real].float().norm()
    assert error < (1e-5 if dtype == "float32" else 2e-3), error.item()


def test_a_transcoder_trains_on_cuda(tmp_path):
    """fp16 autocast, fused Adam and the input/target pair loader on the GPU; the saved folder read on the CPU."""
    from test_transcoders import TRANSCODER, recovered, transcoder_params, write_transcoder_store

    d_out = write_transcoder_store(tmp_path / "store", None)
    params = transcoder_params(tmp_path, tmp_path / "store", {"t": TRANSCODER | {"epochs": 8}})
    result = invoke("train", "--params", str(params), "-S", "train.device=cuda")
    assert result.exit_code == 0, result.output
    assert recovered(tmp_path / "params/sae/config_t_4x", d_out) >= 0.9
    state = torch.load(tmp_path / "params/sae/config_t_4x_final.pt", weights_only=True)
    assert all(group["fused"] for group in state["optimizer"]["param_groups"])


@pytest.mark.parametrize("correlation_scale", [0.0, 0.1])
def test_the_cuda_generator_keeps_the_cpu_generator_s_feature_statistics(correlation_scale):
    """The same synthetic model sampled on the GPU (its own random streams) and on the CPU: every feature's firing
    rate, the co-firing of parents and children, and the mean true L0 agree within binomial noise."""
    from test_synthetic import SMALL

    from pipeline.params import SynthConfig
    from pipeline.synth import generator as synthetic

    cfg = SynthConfig(**{**SMALL.__dict__, "correlation_scale": correlation_scale})
    on_cpu = synthetic.build(cfg, torch.device("cpu"))
    on_gpu = synthetic.SyntheticModel.from_arrays(on_cpu.arrays(), CUDA)
    n = 100_000
    drawn = {
        name: torch.cat([model.sample(4096, synthetic.sample_generator(0, "train", i, device))[1].cpu()
                         for i in range(math.ceil(n / 4096))])[:n] > 0
        for name, model, device in (("cpu", on_cpu, torch.device("cpu")), ("cuda", on_gpu, CUDA))
    }  # fmt: skip
    rates = {name: fired.double().mean(dim=0) for name, fired in drawn.items()}
    expected = on_cpu.expected_rates.double()
    tolerance = 5 * (2 * expected * (1 - expected) / n).sqrt() + 1e-4  # the difference of two binomial means
    assert ((rates["cuda"] - rates["cpu"]).abs() <= tolerance).all()
    l0 = {name: fired.sum(dim=1).double() for name, fired in drawn.items()}
    assert abs(l0["cuda"].mean() - l0["cpu"].mean()) <= 5 * l0["cpu"].std() * math.sqrt(2 / n)
    children = on_cpu.parents >= 0  # a child fires only with its parent, on either device
    for fired in drawn.values():
        parent_fired = fired[:, on_cpu.parents[children]]
        assert not (fired[:, children] & ~parent_fired).any()


def test_a_stream_drawn_on_cuda_is_the_split_a_cuda_store_holds(tmp_path):
    """synth.device=cuda: the streamed train split, generated on the GPU while training, equals the rows of a store
    written on the GPU, and a streamed run trains on CUDA."""
    from test_synthetic import small_store_params

    from pipeline.synth.stream import SyntheticStream

    for name, stream in (("stored", False), ("streamed", True)):
        params = small_store_params(tmp_path, name, stream, device="cuda")
        assert invoke("synth", "--params", params, "-S", "synth.device=cuda").exit_code == 0
    rows = torch.from_numpy(ActivationStore(tmp_path / "stored").activations("train", "synthetic")[:]).float()
    source = SyntheticStream(ActivationStore(tmp_path / "streamed"), CUDA, seed=0)
    for index in range(3):
        assert torch.equal(source.shard(index).cpu(), rows[index * 8192 : (index + 1) * 8192])
    result = invoke("train", "--params", params, "-S", "synth.device=cuda")
    assert result.exit_code == 0, result.output
