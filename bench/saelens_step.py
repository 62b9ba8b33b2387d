"""The trainer's step against SAELens's standard training step, on the same shapes, in one run.

SAELens pins transformer-lens<4, so it cannot be installed beside this project. Run this module from the
checkout's root in an environment of its own that holds sae-lens and the few libraries the training code needs
(the project itself is imported from the checkout, not installed):

    python -m venv /tmp/saelens-env
    /tmp/saelens-env/bin/pip install torch==2.13.0 sae-lens zarr zc.lockfile rich pyyaml   # or your CUDA torch
    /tmp/saelens-env/bin/python -m bench.saelens_step                  # --device cuda on a GPU

Three steps are timed on the same input batch: this project's `train_step` (what the trainer runs each step),
SAELens's `SAETrainer._train_step` for a `StandardTrainingSAE` (what its trainer runs each step: forward, firing
statistics, backward, gradient clipping, Adam, schedulers), and the plain loop of `bench.reference`. They do not
optimise identical losses (SAELens sums the MSE over d_in where ours averages it, and ours adds decorrelation
unless its coefficient is 0), but the work per step is the same six matrix products plus elementwise passes.
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.reference import bench_config, minimal_sae_training, timed
from pipeline.saes import build_sae
from pipeline.train.trainer import train_step


def saelens_step(d_in: int, d_sae: int, batch: int, device: torch.device):
    """A callable running one SAELens training step of a standard SAE on a fixed batch."""
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae, device=str(device)))
    trainer = SAETrainer(
        SAETrainerConfig(
            total_training_samples=batch * 10**6,
            train_batch_size_samples=batch,
            lr=1e-4,
            lr_end=1e-5,
            device=str(device),
        ),
        sae,
        data_provider=iter(()),
    )
    x = torch.randn(batch, d_in, device=device)
    return lambda: trainer._train_step(sae, x)


def our_step(d_in: int, d_sae: int, batch: int, device: torch.device):
    """A callable running one step of this project's trainer (fp32, not a logging step) on a fixed batch."""
    cfg = bench_config(d_sae, l1_coeff=5e-3)
    sae = build_sae(cfg, d_in, generator=torch.Generator().manual_seed(0)).to(device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    x = torch.randn(batch, d_in, device=device)
    return lambda: train_step(sae, optimizer, scaler, x, None, cfg, logged=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16_384, help="tokens per step (config C: 32 x 512)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device, d_sae = torch.device(args.device), args.d_in * args.expansion
    ours = timed(our_step(args.d_in, d_sae, args.batch, device), device, args.repeats)
    saelens = timed(saelens_step(args.d_in, d_sae, args.batch, device), device, args.repeats)
    data = torch.randn(args.batch * args.repeats, args.d_in, device=device)
    minimal_sae_training(data, d_sae, args.batch, 1, 1e-4, 5e-3, 1.0)  # warm-up, as `timed` does
    minimal = minimal_sae_training(data, d_sae, args.batch, args.repeats, 1e-4, 5e-3, 1.0) / args.repeats
    print(json.dumps({
        "shape": {"batch_tokens": args.batch, "d_in": args.d_in, "d_sae": d_sae, "device": str(device)},
        "seconds_per_step": {"ours": ours, "saelens": saelens, "minimal": minimal},
        "ours_vs_saelens": saelens / ours,
        "ours_vs_minimal": minimal / ours,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
