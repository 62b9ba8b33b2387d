"""SAE architectures: each learns a planted dictionary, keeps its sparsity rule, and round-trips through disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import invoke, write_params, write_synthetic_store
from test_train import SYNTHETIC_TRAIN, recovery_and_explained_variance

from pipeline.params import PER_CONFIG_SETTINGS, SAEConfig, TrainConfig, load_params, resolved
from pipeline.saes import ARCHITECTURES, build_sae, sae_class
from pipeline.saes.base import SparseAutoencoder, decorrelation
from pipeline.saes.relu import FREE_INIT_NORM
from pipeline.saes.saelens import load_saelens, save_saelens
from pipeline.saes.topk import TopKSAE

# Settings found for this small dictionary (64 directions in 32 dimensions, ~2.6 active per vector).
PLANTED = {
    "relu": ({}, 0.75),  # 0.84 and 0.78 with two initial seeds (the same on CUDA in fp16); frozen decoder < 0.1
    "topk": ({"k": 4, "dead_tokens": 20_000}, 0.8),
    "batchtopk": ({"k": 4, "dead_tokens": 10_000}, 0.7),
    "jumprelu": ({"l0_coeff": 2e-2, "jumprelu_bandwidth": 0.05, "jumprelu_initial_threshold": 0.1}, 0.8),
    # The first half of the latents must reconstruct alone; with equally frequent features (nothing for early
    # latents to specialise in) they learn mixtures, and fewer rows match: 0.375 measured, none when frozen.
    # Without prefixes it trains as batchtopk does (test below), so the prefix loss is the only difference.
    "matryoshka": ({"k": 4, "dead_tokens": 20_000, "matryoshka_prefixes": [0.5]}, 0.3),
}


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, np.ndarray]:
    root = tmp_path_factory.mktemp("planted")
    dictionary = write_synthetic_store(root / "store", n_train=20_000, n_test=2_000, d=32, n_dirs=64, p_active=0.04)
    return root / "store", dictionary


def train_planted(tmp_path: Path, store: Path, architecture: str, **train) -> Path:
    """Train one SAE of `architecture` on the planted store; `train` overrides the train section."""
    settings, _ = PLANTED[architecture]
    sae = {"s": {"expansion": 2, "batch_size": 4, "lr": 1e-2, "epochs": 10, "architecture": architecture, **settings}}
    params = write_params(
        tmp_path / "params.yaml",
        extract={"store": str(store)},
        train={**SYNTHETIC_TRAIN, "l1_coeff": 2e-2, "out_dir": str(tmp_path / "artifacts"), **train},
        sae=sae,
    )
    result = invoke("train", "--params", str(params), "--config", "s")
    assert result.exit_code == 0, result.output
    return tmp_path / "artifacts/sae/config_s_2x"


@pytest.mark.parametrize("architecture", list(PLANTED))
def test_each_architecture_recovers_a_planted_dictionary(tmp_path, planted, architecture):
    store, dictionary = planted
    folder = train_planted(tmp_path, store, architecture)
    recovered, explained = recovery_and_explained_variance(folder, store, dictionary)
    assert recovered >= PLANTED[architecture][1], recovered
    assert explained >= 0.8
    assert json.loads((folder / "cfg.json").read_text())["metadata"]["architecture"] == architecture


@pytest.mark.parametrize("architecture", list(PLANTED))
def test_the_same_check_fails_with_a_frozen_decoder(tmp_path, planted, architecture, frozen_decoder):
    store, dictionary = planted
    recovered, _ = recovery_and_explained_variance(train_planted(tmp_path, store, architecture), store, dictionary)
    assert recovered < 0.1


def make_sae(name: str, seed: int | None = None, **settings) -> tuple[SparseAutoencoder, SAEConfig]:
    """A 16 -> 64 SAE of architecture `name` as the trainer builds it: the train section's defaults but for
    `settings`; and its resolved config."""
    cfg = resolved(SAEConfig(expansion=4, batch_size=1, lr=1e-2, architecture=name, **settings), TrainConfig())
    return build_sae(cfg, 16, None if seed is None else torch.Generator().manual_seed(seed)), cfg


def positive_sae(name: str, **settings) -> tuple[SparseAutoencoder, SAEConfig]:
    """An SAE whose pre-activations are all positive, so that only the selection rule limits how many fire."""
    sae, cfg = make_sae(name, seed=0, **settings)
    with torch.no_grad():
        sae.b_enc.fill_(100.0)
    return sae, cfg


def trained(sae: SparseAutoencoder, cfg: SAEConfig, x: torch.Tensor, steps: int) -> SparseAutoencoder:
    """`sae` after `steps` Adam steps (lr 1e-2) on the batch `x`, as the trainer takes them."""
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(steps):
        loss, _ = sae.training_loss(x, cfg)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sae.after_step()
    return sae


def test_topk_has_exactly_k_active_latents_per_token():
    sae, _ = positive_sae("topk", k=5)
    _, f = sae(torch.randn(300, 16))
    assert ((f > 0).sum(dim=1) == 5).all()


def test_batchtopk_has_k_active_on_average_per_batch_and_a_threshold_at_inference():
    sae, cfg = positive_sae("batchtopk", k=5)
    sae.train()
    x = torch.randn(300, 16) * torch.linspace(0.1, 3, 300)[:, None]  # tokens of unequal norm get unequal counts
    sae.training_loss(x, cfg)
    f = sae.activate(sae.pre_activations(x))
    per_token = (f > 0).sum(dim=1)
    assert per_token.sum() == 5 * 300 and per_token.min() < per_token.max()
    threshold = sae.threshold.clone()
    assert threshold.unique().numel() == 1 and threshold[0] > 0  # one shared threshold, estimated in training
    sae.eval()
    pre = sae.pre_activations(x)
    torch.testing.assert_close(sae.activate(pre), pre * (pre > threshold))


def test_jumprelu_thresholds_move_and_the_l0_penalty_raises_them():
    sae, cfg = make_sae("jumprelu", jumprelu_bandwidth=0.5, jumprelu_initial_threshold=0.2, l0_coeff=1.0,
                        decorrelation_coeff=0.0)  # fmt: skip
    trained(sae, cfg, torch.randn(512, 16), 20)
    assert (sae.threshold > 0.2).float().mean() > 0.5  # a strong L0 penalty pushes thresholds up


@pytest.mark.parametrize("name", list(PLANTED))
def test_save_then_load_round_trips_exactly(tmp_path, name):
    sae, cfg = make_sae(name, seed=1, k=6, matryoshka_prefixes=[0.25], dead_tokens=1)
    x = torch.randn(256, 16)
    trained(sae, cfg, x, 5)  # so that biases, thresholds and the batch threshold are not at their initial values
    raw = sae.folded(2.0)
    save_saelens(raw, tmp_path / "sae", {"hook_name": "h"})
    loaded, config = load_saelens(tmp_path / "sae")
    assert type(loaded) is type(raw) and loaded.option_values() == raw.option_values()
    saved = {k: v for k, v in raw.state_dict().items() if k not in ("tokens_since_fired", "threshold_updates")}
    for key, value in saved.items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert torch.equal(loaded(x)[0], raw(x)[0])
    torch.testing.assert_close(raw(x / 2)[0] * 2, sae.eval()(x)[0])  # folding changes no reconstruction...
    # ...and no latent, but that a free decoder row's norm moves into its latent (relu; the others' rows are unit)
    torch.testing.assert_close(raw(x / 2)[1], sae(x)[1] * sae.W_dec.norm(dim=1))
    expected = {"relu": "standard", "topk": "topk"}.get(name, "jumprelu")
    assert config["architecture"] == expected


def test_relu_learns_free_decoder_norms_that_weigh_its_l1_and_fold_into_unit_rows():
    x = torch.randn(256, 16)
    sae, cfg = make_sae("relu", seed=0)
    assert cfg.relu_decoder_norm == "free"
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((64,), FREE_INIT_NORM))
    trained(sae, cfg, x, 20)
    norms = sae.W_dec.norm(dim=1)
    assert norms.std() > 1e-3 and not torch.allclose(norms, torch.full((64,), FREE_INIT_NORM))  # learned, not kept
    _, terms = sae.training_loss(x, cfg)
    _, f = sae(x)
    torch.testing.assert_close(terms["l1"], (f * norms).sum(dim=1).mean())
    torch.testing.assert_close(terms["decorrelation"], decorrelation(sae.W_dec / norms[:, None]))  # of directions
    raw = sae.folded(2.0)
    torch.testing.assert_close(raw.W_dec.norm(dim=1), torch.full((64,), 0.5))  # unit on the scaled inputs
    torch.testing.assert_close(raw(x / 2)[0] * 2, sae(x)[0])


def test_relu_with_unit_decoder_norms_keeps_them_and_an_unweighted_l1():
    x = torch.randn(256, 16)
    sae, cfg = make_sae("relu", seed=0, relu_decoder_norm="unit")
    trained(sae, cfg, x, 20)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    _, terms = sae.training_loss(x, cfg)
    torch.testing.assert_close(terms["l1"], sae(x)[1].sum(dim=1).mean())


def test_per_config_settings_fall_back_to_the_train_section(tmp_path):
    train = TrainConfig(l1_coeff=1e-2, k=12)
    cfg = resolved(SAEConfig(expansion=2, batch_size=4, lr=1e-3, architecture="topk", k=7), train)
    assert (cfg.k, cfg.l1_coeff, cfg.warmup_frac) == (7, 1e-2, train.warmup_frac)
    sae = build_sae(cfg, 16)
    assert type(sae) is TopKSAE and sae.option_values() == {"k": 7}


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_each_architecture_declares_the_settings_it_uses(name):
    """The report lists `settings`, and an SAE is rebuilt from its `options`: both must be real params keys."""
    cls = sae_class(name)
    assert cls.name == name
    assert set(cls.options) <= set(cls.settings) <= set(PER_CONFIG_SETTINGS)
    assert cls.penalty[1] in cls.settings


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sae.a.architecture=gated", "invalid sae.a.architecture: 'gated' (allowed: relu, topk"),
        ("sae.b.k=0", "invalid sae.b.k: 0 (allowed: a positive integer)"),
        ("sae.c.matryoshka_prefixes=[0.5,0.25]", "invalid sae.c.matryoshka_prefixes"),
        ("train.l1_coeff=-1", "invalid train.l1_coeff: -1.0"),
        ("sae.a.relu_decoder_norm=fixed", "invalid sae.a.relu_decoder_norm: 'fixed' (allowed: free or unit)"),
    ],
)
def test_bad_per_config_settings_name_the_key(override, message):
    from pipeline.core.errors import PipelineError

    with pytest.raises(PipelineError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_params(Path(__file__).resolve().parents[1] / "params.yaml", [override])


def test_matryoshka_without_prefixes_trains_as_batchtopk():
    x = torch.randn(256, 16)
    weights = {}
    for name in ("batchtopk", "matryoshka"):
        sae, cfg = make_sae(name, seed=0, k=4, matryoshka_prefixes=[])
        weights[name] = trained(sae, cfg, x, 5).state_dict()
    for key, value in weights["batchtopk"].items():  # up to rounding: the prefix sum is not one fused addmm
        torch.testing.assert_close(value, weights["matryoshka"][key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", list(PLANTED))
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_every_architecture_trains_under_autocast(name, amp):
    """The mixed-precision path of each architecture's loss (custom autograd included), on the CPU."""
    from pipeline.core.device import amp_dtype, grad_scaler
    from pipeline.train.trainer import train_step

    device = torch.device("cpu")
    dtype = amp_dtype(amp, device)
    sae, cfg = make_sae(name, seed=0, k=4, matryoshka_prefixes=[0.25], dead_tokens=1)
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x = torch.randn(128, 16)
    for _ in range(3):
        loss, terms, _ = train_step(sae, optimizer, grad_scaler(device, dtype), x, dtype, cfg, True)
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in terms.values())
    changed = [k for k, v in sae.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert {"W_enc", "W_dec", "b_enc", "b_dec"} <= set(changed)
    if name == "jumprelu":
        assert "threshold" in changed
