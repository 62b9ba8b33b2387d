"""Rich progress bars counting tokens, with a tokens/s column and free-form fields (loss, L0, ...)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text

console = Console(stderr=True)


class TokensPerSecond(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed or (task.completed / task.elapsed if task.elapsed else None)
        return Text(f"{speed / 1e3:,.1f}K tok/s" if speed else "… tok/s", style="cyan")


class ProgressBar:
    """One task of a rich Progress: `advance(n_tokens, **fields)` moves it and shows the fields."""

    def __init__(self, progress: Progress, description: str, total: int) -> None:
        self.progress = progress
        self.task = progress.add_task(description, total=total, info="")

    def advance(self, n_tokens: int, **fields: float) -> None:
        info = "  ".join(f"{k} {v:.4g}" for k, v in fields.items())
        self.progress.update(self.task, advance=n_tokens, **({"info": info} if info else {}))


@contextmanager
def progress_bars(totals: dict[str, int]) -> Iterator[dict[str, ProgressBar]]:
    """One bar per entry of `totals` (description -> total tokens), with throughput and elapsed time."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TokensPerSecond(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
    )
    with Progress(*columns, console=console, speed_estimate_period=10.0) as progress:
        yield {name: ProgressBar(progress, name, total) for name, total in totals.items()}
