"""What the benchmarks measure against: a timer, the training loop anyone would write by hand, and which config
and settings a benchmark SAE uses.

Kept apart from `bench.figures` (which needs TransformerLens) so that `bench.saelens_step` can use it in an
environment holding SAELens, which pins an older TransformerLens.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from pipeline.core.device import synchronize
from pipeline.params import Params, SAEConfig, TrainConfig, resolved


def reference_config(params: Params, d_in: int) -> tuple[str, SAEConfig]:
    """The config the figures are measured at: C (the reference report's widest SAE) where params define it, else
    the widest config over `d_in` dimensions."""
    key = "c" if "c" in params.sae else max(params.sae, key=lambda k: params.sae[k].width(d_in))
    return key, params.sae[key]


def bench_config(d_sae: int, architecture: str = "relu", **settings) -> SAEConfig:
    """A resolved config of `d_sae` latents for a timed SAE step: the params' defaults but for `settings` (a timed
    step does not use the batch size, the learning rate schedule or the epochs)."""
    cfg = SAEConfig(d_sae=d_sae, batch_size=1, lr=1e-4, architecture=architecture, **settings)
    return resolved(cfg, TrainConfig())


def timed_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, repeats: int = 3, warmup: bool = True
) -> dict[str, float]:
    """Median wall time of each function, taking turns (A B C A B C ...) after one warm-up each unless `warmup`
    is False.

    Ratios between them then see the same drift in the machine's load, which on a shared machine otherwise makes
    whichever runs last look faster or slower.
    """
    for fn in fns.values() if warmup else ():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 3, warmup: bool = True) -> float:
    """Median wall time of `fn` over `repeats` runs (after one warm-up run unless `warmup` is False)."""
    return timed_interleaved({"fn": fn}, device, repeats, warmup)["fn"]


def minimal_sae_training(
    data: torch.Tensor,
    d_sae: int,
    batch: int,
    n_steps: int,
    lr: float,
    l1_coeff: float,
    decorrelation_coeff: float,
    amp: torch.dtype | None = None,
) -> float:
    """Seconds for `n_steps` of the training loop anyone would write by hand: the reference for the trainer's speed.

    Same SAE, loss (MSE + L1 weighted by the learned decoder norms + decorrelation of the decoder's directions) and
    Adam as the trainer's default relu; shuffled batches gathered from `data` (device-resident); the same precision,
    as PyTorch's AMP recipe writes it (`torch.autocast` in `amp`, a GradScaler for fp16). No warmup schedule, no
    logging, no checkpoints.
    """
    device, d = data.device, data.shape[1]
    generator = torch.Generator().manual_seed(0)
    w_dec = torch.randn(d_sae, d, generator=generator)
    w_dec *= 0.1 / w_dec.norm(dim=1, keepdim=True)
    w_enc = (w_dec.T * (2 * d / d_sae)).contiguous()
    params = [p.to(device).requires_grad_() for p in (w_enc, torch.zeros(d_sae), w_dec, torch.zeros(d))]
    w_enc, b_enc, w_dec, b_dec = params
    optimizer = torch.optim.Adam(params, lr=lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    order = torch.randperm(len(data), generator=generator).to(device)
    synchronize(device)
    start = time.perf_counter()
    for i in range(n_steps):
        x = data[order[i * batch : (i + 1) * batch]].float()
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            f = torch.relu((x - b_dec) @ w_enc + b_enc)
            x_hat = f @ w_dec + b_dec
            norms = w_dec.norm(dim=1)
            directions = w_dec / norms[:, None]
            gram, norms_sq = directions.T @ directions, (directions * directions).sum(dim=1)
            decorrelation_term = ((gram * gram).sum() - (norms_sq * norms_sq).sum()) / (d_sae * (d_sae - 1))
            mse = (x_hat.float() - x).pow(2).mean()
            l1 = (f.float() * norms).sum(dim=1).mean()
            loss = mse + l1_coeff * l1 + decorrelation_coeff * decorrelation_term.float()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    synchronize(device)
    return time.perf_counter() - start
