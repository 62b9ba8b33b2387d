"""The `pipeline` command: one thin subcommand per stage; all parameters come from params.yaml and -S."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.logging import RichHandler

from pipeline.config import DEFAULT_PARAMS_FILE, Params, load_params
from pipeline.errors import PipelineError
from pipeline.progress import console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)

ParamsOption = Annotated[str, typer.Option("--params", help="Parameters file.")]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-S", help="Override a parameter: -S section.key=value (repeatable)."),
]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logs and full tracebacks.")]
ConfigOption = Annotated[str, typer.Option("--config", "-c", help="SAE config key from params `sae`, or all.")]
T = TypeVar("T")


@app.callback()
def main() -> None:
    """GPT-2 residual-stream activations on GSM8K -> sparse autoencoders, evaluated on held-out data."""


def _run(verbose: bool, params_file: str, overrides: list[str] | None, stage: Callable[[Params], T]) -> T:
    """Load parameters and run `stage`; bad input becomes one line on stderr and exit code 2."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
        force=True,
    )
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "transformers", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose else logging.ERROR)
    if not verbose:  # our own progress bars are the ones that matter
        import transformers

        transformers.utils.logging.disable_progress_bar()
    try:
        return stage(load_params(params_file, overrides))
    except PipelineError as exc:
        if verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; rerun with --resume to continue", file=sys.stderr)
        raise typer.Exit(130) from None


@app.command()
def extract(
    resume: Annotated[bool, typer.Option(help="Continue an interrupted extraction, keeping finished shards.")] = False,
    params: ParamsOption = DEFAULT_PARAMS_FILE,
    set_: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """GSM8K through GPT-2: hooked residual-stream activations into the zarr store (extract.store)."""
    from stages import extract as stage

    _run(verbose, params, set_, lambda p: stage.run(p, resume=resume))


@app.command()
def train(
    config: ConfigOption = "all",
    resume: Annotated[bool, typer.Option(help="Continue from the latest periodic checkpoints.")] = False,
    params: ParamsOption = DEFAULT_PARAMS_FILE,
    set_: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Train SAE config(s) from the store; `--config all` trains every config from one read of the data."""
    from stages import train as stage

    _run(verbose, params, set_, lambda p: stage.run(p, which=config, resume=resume))


@app.command()
def evaluate(
    config: ConfigOption = "all",
    params: ParamsOption = DEFAULT_PARAMS_FILE,
    set_: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Evaluate trained SAE(s) on the held-out split: reconstruction, sparsity, splice CE/KL scores."""
    from stages import evaluate as stage

    _run(verbose, params, set_, lambda p: stage.run(p, which=config))


@app.command()
def report(params: ParamsOption = DEFAULT_PARAMS_FILE, set_: SetOption = None, verbose: VerboseOption = False) -> None:
    """Write artifacts/report.md and its figures from the train and eval metrics."""
    from stages import report as stage

    _run(verbose, params, set_, stage.run)


@app.command("run")
def run_all(
    resume: Annotated[bool, typer.Option(help="Resume interrupted extraction and training.")] = False,
    params: ParamsOption = DEFAULT_PARAMS_FILE,
    set_: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Every stage in order without DVC: extract, train (all configs, one read), evaluate, report."""
    from stages import evaluate, extract, report, train

    def all_stages(p: Params) -> None:
        extract.run(p, resume=resume)
        train.run(p, which="all", resume=resume)
        evaluate.run(p, which="all")
        report.run(p)

    _run(verbose, params, set_, all_stages)


@app.command("tiny-assets")
def tiny_assets(
    out: Annotated[str, typer.Argument(help="Directory to write model/ and gsm8k/ into.")] = "data/tiny",
) -> None:
    """Write the tiny random GPT-2 and GSM8K-format rows that params-tiny.yaml runs on (offline, CPU)."""
    from pipeline.tiny import write_tiny_assets

    for kind, path in write_tiny_assets(Path(out)).items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    app()
