"""Transcoders: an SAE that reads one stored hook and predicts another, trained from the store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import invoke, write_params

from pipeline.saes.saelens import load_saelens

D, N_DIRS = 64, 256


def write_transcoder_store(path: Path, skip_map: np.ndarray | None, n_train: int = 30_000, seed: int = 0) -> np.ndarray:
    """Hooks `in` and `out`: a sparse code c (about 4 of 256 atoms active) gives in = c @ D_in + noise and
    out = c @ D_out (+ in @ skip_map.T); returns D_out.

    Atoms come in pairs with opposite input and equal output directions, so that no linear map of `in` predicts
    any of c @ D_out: the best linear path is then the skip map alone, which a skip transcoder can be asked to find.
    """
    from pipeline.store.writer import StoreWriter

    rng = np.random.default_rng(seed)
    d_in, d_out = (rng.standard_normal((N_DIRS // 2, D)) for _ in range(2))
    d_in /= np.linalg.norm(d_in, axis=1, keepdims=True)
    d_out /= np.linalg.norm(d_out, axis=1, keepdims=True)
    d_in, d_out = np.concatenate([d_in, -d_in]), np.concatenate([d_out, d_out])
    attrs = {
        "hooks": ["in", "out"], "d_model": D, "dtype": "float32", "shard_tokens": 8192, "chunk_tokens": 1024,
        "splits": ["train", "test"], "model": "synthetic", "dataset": "synthetic", "n_ctx": 100, "bos_token_id": 0,
    }  # fmt: skip
    writer = StoreWriter(path, attrs, resume=False)
    for split, n in (("train", n_train), ("test", 3_000)):
        code = rng.uniform(1.0, 2.0, (n, N_DIRS)) * (rng.random((n, N_DIRS)) < 4 / N_DIRS)
        x = code @ d_in + 0.05 * rng.standard_normal((n, D))
        y = code @ d_out + (0 if skip_map is None else x @ skip_map.T)
        writer.add_split(split, np.zeros(n, np.int32), np.arange(0, n + 1, 100, dtype=np.int64))
        for index, start, end in writer.pending_shards(split):
            writer.write_shard(split, index, start, {"in": x[start:end].astype(np.float32),
                                                     "out": y[start:end].astype(np.float32)})  # fmt: skip
    writer.finalize({})
    return d_out[: N_DIRS // 2].astype(np.float32)


def transcoder_params(tmp_path: Path, store: Path, configs: dict, name: str = "params") -> Path:
    path = write_params(
        tmp_path / f"{name}.yaml",
        extract={"store": str(store), "hooks": ["in", "out"]},
        train={"hook": "in", "seq_len": 64, "l1_coeff": 3e-3, "device": "cpu", "exclude_bos": False,
               "decay_frac": 0.3, "log_every": 50, "out_dir": str(tmp_path / name)},
    )  # fmt: skip
    path.write_text(yaml.safe_dump(yaml.safe_load(path.read_text()) | {"sae": configs}))
    return path


TRANSCODER = {"expansion": 4, "batch_size": 4, "lr": 1e-2, "epochs": 12, "target_hook": "out"}


def recovered(folder: Path, d_out: np.ndarray) -> float:
    """Share of the true output atoms some decoder row matches with cosine >= 0.9."""
    sae, _ = load_saelens(folder)
    decoder = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1)
    return ((torch.from_numpy(d_out) @ decoder.T).max(dim=1).values >= 0.9).float().mean().item()


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, np.ndarray]:
    root = tmp_path_factory.mktemp("transcoder")
    return root / "store", write_transcoder_store(root / "store", None)


def test_a_transcoder_recovers_the_output_dictionary(tmp_path, planted):
    store, d_out = planted
    params = transcoder_params(tmp_path, store, {"t": TRANSCODER})
    result = invoke("train", "--params", str(params))
    assert result.exit_code == 0, result.output
    assert recovered(tmp_path / "params/sae/config_t_4x", d_out) >= 0.9


def test_the_transcoder_check_fails_with_a_frozen_decoder(tmp_path, planted, frozen_decoder):
    store, d_out = planted
    params = transcoder_params(tmp_path, store, {"t": TRANSCODER})
    assert invoke("train", "--params", str(params)).exit_code == 0
    assert recovered(tmp_path / "params/sae/config_t_4x", d_out) < 0.9


def test_a_skip_transcoder_recovers_the_skip_map(tmp_path):
    rng = np.random.default_rng(1)
    skip_map = rng.standard_normal((D, D)) / np.sqrt(D)
    d_out = write_transcoder_store(tmp_path / "store", skip_map, seed=2)
    params = transcoder_params(tmp_path, tmp_path / "store", {"s": TRANSCODER | {"skip": True}})
    result = invoke("train", "--params", str(params))
    assert result.exit_code == 0, result.output
    sae, cfg = load_saelens(tmp_path / "params/sae/config_s_4x")
    assert cfg["architecture"] == "skip_transcoder" and cfg["d_out"] == D and not cfg["apply_b_dec_to_input"]
    learned = sae.W_skip.detach().numpy().ravel()
    # Least squares of `out` on `in` over the training split misses the map by 0.07 (finite-sample correlation of
    # the sparse part with the input); the trained path by 0.29, against 1.0 for the zero it starts from.
    cosine = learned @ skip_map.ravel() / np.linalg.norm(learned) / np.linalg.norm(skip_map)
    assert cosine >= 0.9, cosine
    assert recovered(tmp_path / "params/sae/config_s_4x", d_out) >= 0.9
