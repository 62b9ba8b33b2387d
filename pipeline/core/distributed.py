"""torch.distributed, the one place that knows about ranks: launched by `torchrun`, or a single process.

Under `torchrun` (WORLD_SIZE > 1 in the environment) the CLI opens the process group for the stages that
run on several processes (extract, train): gloo for CPU tensors, NCCL for CUDA ones when CUDA is present. In a
single process every function here answers as rank 0 of 1 and communicates nothing, so the stages have one
code path. torch is imported on first use, so that the CLI can ask how it was launched before torch loads.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

LAUNCHED_BY_US = "PIPELINE_NPROC"  # set in the processes `relaunch` starts, so that they never relaunch again


def _dist() -> ModuleType:
    import torch.distributed

    return torch.distributed


def launched() -> bool:
    """Whether this process is one of several started by torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch_rank() -> int:
    """This process's rank as torchrun assigned it (0 when not launched by torchrun); valid before and after the
    process group exists, so it can name the process in an error line."""
    return int(os.environ.get("RANK", "0"))


def rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the process that creates shared outputs, writes the final ones and shows progress."""
    return rank() == 0


def local_rank() -> int:
    """This process's index on its machine (its GPU under torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


@contextmanager
def process_group() -> Iterator[None]:
    """The process group for the block when launched by torchrun; nothing otherwise."""
    import torch

    dist = _dist()
    if not launched() or dist.is_initialized():
        yield
        return
    backend = "gloo"
    if torch.cuda.is_available() and local_rank() < torch.cuda.device_count():  # else a CPU run, or an error later
        torch.cuda.set_device(local_rank())
        backend = "cpu:gloo,cuda:nccl"  # CPU-resident tensors (e.g. a CPU run on a GPU machine) still work
    dist.init_process_group(backend)
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    dist = _dist()
    if dist.is_initialized():
        dist.barrier()


def broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank (a picklable object; pickled only between our own processes)."""
    dist = _dist()
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order."""
    dist = _dist()
    if not dist.is_initialized():
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def average_(tensors: Sequence[torch.Tensor]) -> None:
    """Replace each tensor by its mean over ranks, in place, with one all-reduce (same dtype and device)."""
    import torch

    dist = _dist()
    if not dist.is_initialized() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def maximum_(tensor: torch.Tensor) -> None:
    """Replace `tensor` by its elementwise maximum over ranks, in place."""
    dist = _dist()
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)


def relaunch(nproc: int, arguments: Sequence[str]) -> int:
    """Run `pipeline <arguments>` as `nproc` local processes under torchrun; returns its exit code.

    CPU threads are split between the processes (torchrun would give each one thread) unless the user set
    OMP_NUM_THREADS.
    """
    env = dict(os.environ, **{LAUNCHED_BY_US: str(nproc)})
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    command = [
        sys.executable, "-m", "pipeline.core.distributed", "--standalone", f"--nproc-per-node={nproc}",
        "-m", "pipeline.cli", *arguments,
    ]  # fmt: skip
    return subprocess.run(command, env=env, check=False).returncode


def _launch(arguments: Sequence[str]) -> int:
    """torchrun (`arguments` are its own), but when a process fails: its exit code, without the launcher's
    traceback and failure report (the processes have printed what went wrong, one line each)."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(get_args_parser().parse_args(list(arguments)))
    except ChildFailedError as failure:
        code = failure.get_first_failure()[1].exitcode
        return code if code > 0 else 128 - code  # killed by signal N: 128 + N, as a shell reports it
    except SignalException as signal:  # Ctrl-C or a kill of the launcher; the processes were stopped with it
        return 128 + int(signal.sigval)
    return 0


def should_relaunch(nproc: int) -> bool:
    """Whether a command asked for `nproc` processes must start them (it is not one of them already)."""
    return nproc > 1 and not launched() and LAUNCHED_BY_US not in os.environ


if __name__ == "__main__":
    sys.exit(_launch(sys.argv[1:]))
