"""Device, dtype and mixed-precision choices: the one place they are made."""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from pipeline.core import distributed
from pipeline.core.errors import PipelineError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when present, else CPU; an explicit CUDA request without CUDA is an error.

    Under torchrun, a CUDA device without an index is this process's own GPU (cuda:LOCAL_RANK).
    """
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"device {name!r} was asked for but CUDA is not available here")
    if device.type == "cuda" and device.index is None and distributed.launched():
        if distributed.local_rank() >= torch.cuda.device_count():
            raise PipelineError(
                f"process {distributed.local_rank()} on this machine has no GPU of its own: "
                f"{torch.cuda.device_count()} visible; start at most that many processes per machine"
            )
        return torch.device("cuda", distributed.local_rank())
    return device


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """Model compute dtype: `auto` is float16 on CUDA and float32 on CPU."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def extraction_batch_tokens(configured: int | None, device: torch.device) -> int:
    """Padded tokens per extraction forward pass; None picks by device.

    GPUs want large batches; on CPU small ones are faster (fewer padded tokens, better cache use: the figures are
    in docs/performance.md).
    """
    if configured is not None:
        return configured
    return 16384 if device.type == "cuda" else 2048


def amp_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for SAE training, or None for plain fp32. `auto` is fp16 on CUDA, none on CPU."""
    if name == "auto":
        name = "fp16" if device.type == "cuda" else "none"
    return AMP_DTYPES.get(name)


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast context for `dtype` on `device`, or a no-op when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16, the one dtype whose gradients underflow."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def fused_adam(device: torch.device) -> bool:
    """Adam's fused kernel on CUDA: one kernel for all parameters, and the GradScaler then hands it the inf check
    on the device instead of reading it on the host every step. Elsewhere PyTorch's default implementation, which
    keeps CPU training bit-identical to what it was."""
    return device.type == "cuda"


class StepTimer:
    """Seconds of device time spent in a run's steps, without making the host wait for the device each time.

    On CUDA, events recorded around each stretch of steps are read only when `seconds` is asked for (at a log
    step or the end, when the caller synchronises anyway); elsewhere the host's clock is the device's.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.total = 0.0
        self.started: float | torch.cuda.Event = 0.0

    def start(self) -> None:
        self.started = self._mark()

    def stop(self) -> None:
        if self.cuda:
            self.pending.append((self.started, self._mark()))
        else:
            self.total += time.perf_counter() - self.started

    def seconds(self) -> float:
        for start, end in self.pending:
            end.synchronize()
            self.total += start.elapsed_time(end) / 1000
        self.pending.clear()
        return self.total

    def _mark(self) -> float | torch.cuda.Event:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event


def uses_pinned_memory(device: torch.device) -> bool:
    """Pinned host buffers only help (and only exist) when copying to CUDA."""
    return device.type == "cuda"


def to_host(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, np.ndarray], Callable[[], None]]:
    """Start copying `tensors` to host memory: the host arrays, and a function that returns once they are filled.

    From CUDA the copies go to pinned memory without blocking, so this thread goes on queueing the GPU's next work
    while another waits for the copy; from the CPU they are plain copies, done on return.
    """
    devices = {tensor.device for tensor in tensors.values()}
    if not any(uses_pinned_memory(device) for device in devices):
        return {name: tensor.cpu().numpy() for name, tensor in tensors.items()}, lambda: None
    host = {name: torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for name, t in tensors.items()}
    for name, tensor in tensors.items():
        host[name].copy_(tensor, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return {name: tensor.numpy() for name, tensor in host.items()}, copied.synchronize


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    """Peak memory and what it measures: CUDA allocator peak, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "process_peak_rss"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe(device: torch.device) -> str:
    """Human-readable name of the hardware behind `device`."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
