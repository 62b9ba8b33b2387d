"""Scaling figures: several processes against one, launched as users launch them (docs/scaling.md).

10. extract 2 vs 1 procs   wall time of `pipeline extract` on one process / with extract.nproc=2, same documents
                           in SHARDS_PER_PROCESS shards a process (a shard is the unit of work; the whole command:
                           process start, model load and the store's finalisation included)
11. train 2 vs 1 procs     tokens/s inside the training steps of data-parallel `pipeline train` with train.nproc=2 /
                           the same run on one process (loading and process start excluded)
12. DDP communication      in a 2-process run of config C's step on its share of the batch, the share of the step
                           spent averaging gradients: (step with the all-reduce - the same step without) / with

On a CPU the processes split the cores (OMP_NUM_THREADS = cores / processes), so the ratios say what process
sharding costs or gains on the same hardware, not what another GPU adds; `cores` is recorded with them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch

from bench.reference import bench_config, reference_config, timed_interleaved
from bench.startup import pipeline_seconds
from pipeline.artifacts import sae_outputs
from pipeline.core import distributed
from pipeline.core.device import amp_dtype, grad_scaler, resolve_device
from pipeline.core.errors import PipelineError
from pipeline.params import Params, SAEConfig
from pipeline.saes import build_sae
from pipeline.store import ActivationStore
from pipeline.train.trainer import train_step

CHECKOUT = Path(__file__).resolve().parents[1]  # so that the processes it starts import `bench` from here

PROCESSES = 2
SHARDS_PER_PROCESS = 4


def run(params: Params, n_docs: int, n_tokens: int, store: ActivationStore, workdir: Path) -> dict:
    """Figures 10-12: extraction of the first `n_docs` documents of the last split (`n_tokens` tokens, as figure
    1 counted them); training config C for one epoch of `store`.

    Empty where the model's or the training's device is CUDA with fewer than PROCESSES GPUs (one GPU a process).
    """
    devices = {resolve_device(params.model.device), resolve_device(params.train.device)}
    if any(d.type == "cuda" for d in devices) and torch.cuda.device_count() < PROCESSES:
        return {}
    key, cfg = reference_config(params, store.d_model)
    extract_s = {}
    for nproc in (1, PROCESSES):
        data = replace(params.data, splits=params.data.splits[-1:], max_docs=n_docs)  # the extraction figures' docs
        shard_tokens, chunk_tokens = extraction_shards(n_tokens, params.extract.chunk_tokens)
        extract = replace(params.extract, store=str(workdir / f"scaling-store-{nproc}"), nproc=nproc,
                          shard_tokens=shard_tokens, chunk_tokens=chunk_tokens)  # fmt: skip
        extract_s[nproc] = pipeline_seconds(workdir, replace(params, data=data, extract=extract), "extract")
    tokens_per_s = {}
    for nproc in (1, PROCESSES):
        out_dir = workdir / f"scaling-train-{nproc}"
        train = replace(params.train, hook="bench", exclude_bos=False, nproc=nproc, distribute="data",
                        out_dir=str(out_dir), checkpoint_every=10**9)  # fmt: skip
        config = SAEConfig(batch_size=cfg.batch_size, lr=cfg.lr, expansion=cfg.expansion, d_sae=cfg.d_sae, epochs=1)
        bench_params = replace(params, extract=replace(params.extract, store=str(store.path)), train=train,
                               sae={key: config})  # fmt: skip
        pipeline_seconds(workdir, bench_params, "train", "--config", key)
        details = json.loads(sae_outputs(out_dir, key, config)["train_details"].read_text())
        tokens_per_s[nproc] = details["tokens_per_s"]
    communication = communication_share(workdir, params.train.device, params.train.amp, store.d_model,
                                        cfg.width(store.d_model), cfg.batch_size * params.train.seq_len)  # fmt: skip
    return {
        "cores": os.cpu_count(),
        "processes": PROCESSES,
        "extract_docs": n_docs,
        "extract_wall_s": extract_s,
        "extract_shards": _shards(ActivationStore(workdir / "scaling-store-1")),
        "extract_2proc_vs_1proc": extract_s[1] / extract_s[PROCESSES],
        "train_config": key,
        "train_tokens_per_s": tokens_per_s,
        "train_2proc_vs_1proc": tokens_per_s[PROCESSES] / tokens_per_s[1],
        **communication,
    }


def extraction_shards(n_tokens: int, chunk_tokens: int) -> tuple[int, int]:
    """(shard_tokens, chunk_tokens) that cut `n_tokens` into about SHARDS_PER_PROCESS shards a process."""
    target = max(1, n_tokens // (SHARDS_PER_PROCESS * PROCESSES))
    chunk = min(1024, chunk_tokens, target)
    return chunk * math.ceil(target / chunk), chunk


def _shards(store: ActivationStore) -> int:
    return sum(math.ceil(stats["n_tokens"] / store.shard_tokens) for stats in store.attrs["split_stats"].values())


def communication_share(
    workdir: Path, device: str, amp: str, d_in: int, d_sae: int, batch_tokens: int
) -> dict[str, float]:
    """Figure 12, measured by `PROCESSES` processes under torchrun (this module's `__main__`)."""
    out = workdir / "communication.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={PROCESSES}",
        "-m", "bench.scaling", str(out), device, amp, str(d_in), str(d_sae), str(batch_tokens),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(CHECKOUT), os.environ.get("PYTHONPATH")])))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // PROCESSES)))
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode:
        raise PipelineError(f"scaling bench: the communication measurement failed: {result.stderr.strip()[-2000:]}")
    return json.loads(out.read_text())


def _measure_communication(out: Path, device: str, amp: str, d_in: int, d_sae: int, batch_tokens: int) -> None:
    """On every rank: config C's step on 1/W of the batch, with and without averaging the gradients."""
    with distributed.process_group():
        where = resolve_device(device)
        dtype = amp_dtype(amp, where)
        cfg = bench_config(d_sae, l1_coeff=1e-3)
        sae = build_sae(cfg, d_in).to(where)
        optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)
        scaler = grad_scaler(where, dtype)
        x = torch.randn(batch_tokens // distributed.world_size(), d_in, device=where)

        def step(average: bool):
            return lambda: train_step(sae, optimizer, scaler, x, dtype, cfg, logged=False, average_over_ranks=average)

        times = timed_interleaved({"alone": step(False), "averaged": step(True)}, where)
        if distributed.is_main():
            out.write_text(json.dumps({
                "ddp_step_s": times["averaged"],
                "ddp_step_without_communication_s": times["alone"],
                "ddp_communication_share": max(0.0, times["averaged"] - times["alone"]) / times["averaged"],
                "ddp_gradient_bytes": 4 * sum(p.numel() for p in sae.parameters()),
            }))  # fmt: skip


if __name__ == "__main__":
    path, device_name, amp_name, *sizes = sys.argv[1:]
    _measure_communication(Path(path), device_name, amp_name, *(int(s) for s in sizes))
