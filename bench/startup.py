"""Each stage's fixed cost: the wall time of `pipeline <stage>` on a run too small for the stage's own work to
count (the first STARTUP_DOCS documents of each split, one small SAE), started as a user starts it: the
interpreter, the imports, the model's load, reading the store and writing the outputs."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import yaml

from pipeline.core.errors import PipelineError
from pipeline.params import Params, SAEConfig, params_to_dict

STAGES = (
    ("extract",), ("label",), ("train", "--config", "all"), ("evaluate",), ("probe",), ("analyze",), ("stability",),
    ("report",),
)  # fmt: skip
STARTUP_DOCS = 4


def run(params: Params, workdir: Path) -> dict[str, float]:
    """Seconds of each stage, in order, on a small run of `params`' model and data (in `workdir`)."""
    hook = params.train.hook if params.train.hook in params.extract.hooks else params.extract.hooks[-1]
    small = replace(
        params,
        data=replace(params.data, max_docs=STARTUP_DOCS),
        extract=replace(params.extract, store=str(workdir / "startup-store"), nproc=1),
        sae={"s": SAEConfig(expansion=1, batch_size=1, lr=1e-3, epochs=1)},
        train=replace(params.train, hook=hook, seq_len=16, out_dir=str(workdir / "startup-out"), nproc=1),
        probe=replace(params.probe, labels=str(workdir / "startup-labels"), min_positives=1),  # 2 documents a half
    )
    return {command[0]: pipeline_seconds(workdir, small, *command) for command in STAGES}


def pipeline_seconds(workdir: Path, params: Params, *command: str) -> float:
    """Wall seconds of `pipeline <command>` in a fresh process on `params` (its own params file), as a user runs
    it; a failure is an error carrying the process's last lines."""
    path = workdir / f"bench-params-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in params_to_dict(params).items() if k != "command"}))
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", *command, "--params", str(path)],
                            capture_output=True, text=True, check=False)  # fmt: skip
    if result.returncode:
        raise PipelineError(f"bench: pipeline {' '.join(command)} failed: {result.stderr.strip()[-2000:]}")
    return time.perf_counter() - started
