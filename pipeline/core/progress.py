"""Rich progress bars with a throughput column and free-form fields (loss, L0, ...)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text

console = Console(stderr=True)


class Throughput(ProgressColumn):
    """Units per second: over the time the work itself took when the bar is told it (`advance(seconds=...)`),
    else over wall time. Training bars use the former, so they show the same tokens/s as the train metrics."""

    def render(self, task: Task) -> Text:
        busy_s = task.fields.get("busy_s", 0.0)
        if busy_s:
            speed = task.fields["busy_units"] / busy_s
        else:
            speed = task.finished_speed or task.speed or (task.completed / task.elapsed if task.elapsed else None)
        unit = task.fields["unit"]
        if not speed:
            return Text(f"… {unit}/s", style="cyan")
        scaled, prefix = next(((speed / f, p) for f, p in ((1e9, "G"), (1e6, "M"), (1e3, "K")) if speed >= f),
                              (speed, ""))  # fmt: skip
        return Text(f"{scaled:,.1f}{prefix} {unit}/s", style="cyan")


class ProgressBar:
    """One task of a rich Progress: `advance(n, seconds=None, **fields)` moves it and shows the fields."""

    def __init__(self, progress: Progress, description: str, total: int, unit: str) -> None:
        self.progress = progress
        self.task = progress.add_task(description, total=total, info="", unit=unit, busy_s=0.0, busy_units=0)
        self.busy_s = 0.0
        self.busy_units = 0

    def advance(self, n: int, seconds: float | None = None, **fields: float) -> None:
        info = "  ".join(f"{k} {v:.4g}" for k, v in fields.items())
        if seconds is not None:
            self.busy_s += seconds
            self.busy_units += n
        self.progress.update(
            self.task,
            advance=n,
            busy_s=self.busy_s,
            busy_units=self.busy_units,
            **({"info": info} if info else {}),
        )


@contextmanager
def progress_bars(totals: dict[str, int], unit: str = "tok") -> Iterator[dict[str, ProgressBar]]:
    """One bar per entry of `totals` (description -> total units), with throughput and elapsed time."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        Throughput(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
    )
    from pipeline.core import distributed  # here, not above: the CLI's console must not import torch

    shown = distributed.is_main()  # under torchrun, rank 0's bars stand for every rank's
    with Progress(*columns, console=console, speed_estimate_period=10.0, disable=not shown) as progress:
        yield {name: ProgressBar(progress, name, total, unit) for name, total in totals.items()}
