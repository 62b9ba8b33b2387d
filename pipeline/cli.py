"""The `pipeline` command: one thin subcommand per stage; all parameters come from params.yaml and -S.

Parameters are read and validated before torch or TransformerLens is imported, so a typo answers at once.
"""

from __future__ import annotations

import importlib
import logging
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from pipeline.core import distributed
from pipeline.core.errors import PipelineError
from pipeline.params import DEFAULT_PARAMS_FILE, Params, configured_sae_keys, load_params

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

ParamsOption = Annotated[str, typer.Option("--params", help="Parameters file.")]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-S",
        help="Override a parameter: -S section.key=value, the value as YAML (a string parameter "
        "takes it as typed: -S 'data.template={text}'); repeatable.",
    ),
]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logs and full tracebacks.")]
ConfigOption = Annotated[
    str,
    typer.Option(
        "--config",
        "-c",
        help=f"SAE config: a key of params `sae` ({', '.join(configured_sae_keys())} in ./{DEFAULT_PARAMS_FILE}), "
        "or all.",
    ),
]
T = TypeVar("T")


@app.callback()
def main() -> None:
    """GPT-2 residual-stream activations on GSM8K -> sparse autoencoders, evaluated on held-out data."""


def _stage(name: str):
    """A stage module, imported only once parameters are valid (it pulls in torch and TransformerLens)."""
    return importlib.import_module(f"stages.{name}")


def _run(
    command: list[str],
    verbose: bool,
    params_file: str,
    overrides: list[str] | None,
    stage: Callable[[Params], T],
    nproc: Callable[[Params], int] | None = None,
) -> T | None:
    """Load parameters and run `stage`; bad input becomes one line on stderr and exit code 2.

    A stage that can run on several processes says how many with `nproc`: more than one starts them under
    torchrun (unless this process is already one of them), and torchrun's processes join its process group.
    """
    from rich.logging import RichHandler

    from pipeline.core.progress import console

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
        force=True,
    )
    try:
        params = load_params(params_file, overrides)
        options = _options(params_file, overrides)
        params.command = shlex.join(["pipeline", *command, *options])
        _quiet_libraries(verbose)
        if nproc is None:
            if distributed.launched():
                raise PipelineError(f"pipeline {command[0]} runs as one process: start it without torchrun")
            return stage(params)
        if distributed.should_relaunch(nproc(params)):
            exit_code = distributed.relaunch(nproc(params), [*command, *options, *(["-v"] * verbose)])
            if exit_code:
                raise typer.Exit(exit_code)
            return None
        with distributed.process_group():
            if not distributed.is_main() and not verbose:  # one process speaks for all: rank 0
                logging.getLogger().setLevel(logging.WARNING)
            return stage(params)
    except _environment_errors() as exc:  # bad input, or the environment (disk full, credentials): not a bug
        if verbose:
            raise
        rank = distributed.launch_rank()  # under torchrun every process says it, so say which one
        source = "" if isinstance(exc, PipelineError | OSError) else "object storage: "
        _say(f"error: {f'[process {rank}] ' if rank else ''}{source}{exc}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        _say("interrupted: finished work is kept; rerun with --resume to continue")
        raise typer.Exit(130) from None


def _environment_errors() -> tuple[type[BaseException], ...]:
    """Bad input, and faults of the machine or the object store (disk full, permissions, missing credentials)."""
    errors: list[type[BaseException]] = [PipelineError, OSError]
    boto = sys.modules.get("botocore.exceptions")  # loaded only when a store is on S3
    if boto is not None:
        errors.append(boto.BotoCoreError)
    return tuple(errors)


def _say(line: str) -> None:
    """One line on stderr in one write: under torchrun several processes share it, and print's separate write
    of the newline lets their lines run together."""
    try:
        descriptor = sys.stderr.fileno()
    except (OSError, ValueError):  # a captured stream (the tests' CLI runner): no descriptor, no other writer
        sys.stderr.write(line + "\n")
        return
    sys.stderr.flush()
    os.write(descriptor, (line + "\n").encode())  # one system call: atomic on a pipe (< PIPE_BUF)


def _options(params_file: str, overrides: list[str] | None) -> list[str]:
    """The command-line options that select these parameters."""
    options = [] if params_file == DEFAULT_PARAMS_FILE else ["--params", params_file]
    return options + [word for item in overrides or [] for word in ("-S", item)]


def _quiet_libraries(verbose: bool) -> None:
    for noisy in (
        "httpx",
        "urllib3",
        "filelock",
        "huggingface_hub",
        "transformers",
        "datasets",
        "botocore",
        "aiobotocore",
        "s3fs",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose else logging.ERROR)


@app.command()
def extract(
    resume: Annotated[bool, typer.Option(help="Continue an interrupted extraction, keeping finished shards.")] = False,
    force: Annotated[bool, typer.Option(help="Recompute even when the store is up to date.")] = False,
    params: ParamsOption = DEFAULT_PARAMS_FILE,
    set_: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """GSM8K through GPT-2: hooked residual-stream activations into the zarr store (extract.store)."""
    command = ["extract", *(["--resume"] if resume else []), *(["--force"] if force else [])]
    _run(command, verbose, params, set_, lambda p: _stage("extract").run(p, resume=resume, force=force), _extract_nproc)


@app.command()
def synth(
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run, keeping finished shards.")] = False,
    force: Annotated[bool, typer.Option(help="Recompute even when the store is up to date.")] = False,
    params: ParamsOption = DEFAULT_PARAMS_FILE,
    set_: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Synthetic activations with known features (params `synth`) into the store: extract with its source set to
    synthetic."""
    extract(
        resume=resume, force=force, params=params, set_=[*(set_ or []), "extract.source=synthetic"], verbose=verbose
    )


@app.command()
def train(
    config: ConfigOption = "all",
    resume: Annotated[bool, typer.Option(help="Continue from the latest periodic checkpoints.")] = False,
    params: ParamsOption = DEFAULT_PARAMS_FILE,
    set_: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Train SAE config(s) from the store; `--config all` trains every config from one read of the data."""
    command = ["train", "--config", config, *(["--resume"] if resume else [])]
    _run(command, verbose, params, set_, lambda p: _stage("train").run(p, which=config, resume=resume), _train_nproc)


def _checkout_module(name: str):
    """A module of this repository's checkout that is not part of the installed package (benchmarks)."""
    checkout = Path(__file__).resolve().parents[1]
    if not (checkout / name.split(".")[0]).is_dir():
        raise PipelineError(f"{name.split('.')[0]}/ is not installed with the package: run this from a checkout")
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    return importlib.import_module(name)


def _extract_nproc(params: Params) -> int:
    return params.extract.nproc


def _train_nproc(params: Params) -> int:
    return params.train.nproc


@app.command()
def evaluate(
    config: ConfigOption = "all",
    params: ParamsOption = DEFAULT_PARAMS_FILE,
    set_: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Evaluate trained SAE(s) on the held-out split: reconstruction, sparsity, splice CE/KL scores."""
    _run(["evaluate", "--config", config], verbose, params, set_, lambda p: _stage("evaluate").run(p, which=config))


@app.command()
def analyze(
    config: ConfigOption = "all",
    params: ParamsOption = DEFAULT_PARAMS_FILE,
    set_: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """What each latent learned (top contexts, histograms, logit effects): a feature browser per config."""
    _run(["analyze", "--config", config], verbose, params, set_, lambda p: _stage("analyze").run(p, which=config))


@app.command()
def export(
    format_: Annotated[str, typer.Option("--format", help="What to write: neuronpedia (SAE-Dashboard's batches).")],
    config: ConfigOption = "all",
    model_id: Annotated[
        str | None,
        typer.Option(help="The model's id on Neuronpedia (default: TransformerLens's alias, e.g. gpt2-small)."),
    ] = None,
    params: ParamsOption = DEFAULT_PARAMS_FILE,
    set_: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """A config's latents in another tool's format, from its feature browser (run `pipeline analyze` first)."""
    _run(["export", "--format", format_, "--config", config], verbose, params, set_,
         lambda p: _stage("export").run(p, which=config, fmt=format_, model_id=model_id))  # fmt: skip


@app.command()
def label(params: ParamsOption = DEFAULT_PARAMS_FILE, set_: SetOption = None, verbose: VerboseOption = False) -> None:
    """Label every token of the store from the solutions' own structure (question, steps, calculator annotations,
    numbers) into probe.labels."""
    _run(["label"], verbose, params, set_, lambda p: _stage("label").run(p))


@app.command()
def probe(
    config: ConfigOption = "all",
    params: ParamsOption = DEFAULT_PARAMS_FILE,
    set_: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """What the SAEs keep of the reasoning: probes on the token labels (run `pipeline label` first) on the
    activations, the reconstructions and the latents; SAEBench's sparse probing."""
    _run(["probe", "--config", config], verbose, params, set_, lambda p: _stage("probe").run(p, which=config))


@app.command()
def stability(
    params: ParamsOption = DEFAULT_PARAMS_FILE, set_: SetOption = None, verbose: VerboseOption = False
) -> None:
    """Feature stability: how many latents of each trained config have a counterpart in each other config."""
    _run(["stability"], verbose, params, set_, lambda p: _stage("stability").run(p))


@app.command()
def report(params: ParamsOption = DEFAULT_PARAMS_FILE, set_: SetOption = None, verbose: VerboseOption = False) -> None:
    """Write artifacts/report.md and its figures from the train, eval and stability outputs."""
    _run(["report"], verbose, params, set_, lambda p: _stage("report").run(p))


@app.command("run")
def run_all(
    resume: Annotated[bool, typer.Option(help="Resume interrupted extraction and training.")] = False,
    params: ParamsOption = DEFAULT_PARAMS_FILE,
    set_: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Every stage in order without DVC: extract, label, train (all configs, one read), evaluate, probe, analyze,
    stability, report."""

    def in_processes(nproc: int, arguments: list[str], stage: Callable[[], object]) -> None:
        if not distributed.should_relaunch(nproc):
            stage()
        elif exit_code := distributed.relaunch(nproc, [*arguments, *_options(params, set_), *(["-v"] * verbose)]):
            raise PipelineError(f"pipeline {arguments[0]} on {nproc} processes failed (exit code {exit_code})")

    def all_stages(p: Params) -> None:
        from pipeline.model import sharing_models

        again = ["--resume"] if resume else []
        with sharing_models():  # one model load for extract, evaluate and analyze
            in_processes(p.extract.nproc, ["extract", *again], lambda: _stage("extract").run(p, resume=resume))
            _stage("label").run(p)
            in_processes(p.train.nproc, ["train", *again], lambda: _stage("train").run(p, which="all", resume=resume))
            _stage("evaluate").run(p, which="all")
            _stage("probe").run(p, which="all")
            _stage("analyze").run(p, which="all")
        _stage("stability").run(p)
        _stage("report").run(p)

    _run(["run", *(["--resume"] if resume else [])], verbose, params, set_, all_stages)


@app.command()
def verify(
    params: ParamsOption = DEFAULT_PARAMS_FILE,
    set_: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Check every file of the activation store (extract.store) against the checksums recorded when it was written."""

    def check(p: Params) -> None:
        from pipeline.core.progress import progress_bars
        from pipeline.store import ActivationStore

        store = ActivationStore(p.extract.store)
        total = sum(record["size"] for record in store.manifest.values())
        with progress_bars({"verify": total}, unit="bytes") as bars:
            problems = store.verify(on_bytes=bars["verify"].advance)
        if problems:
            shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
            raise PipelineError(f"{store.path} is damaged: {shown}; re-extract with `pipeline extract --force`")
        print(f"{store.path}: all {len(store.manifest)} files ({total / 1e9:.2f} GB) match their checksums")

    _run(["verify"], verbose, params, set_, check)


@app.command()
def bench(
    docs: Annotated[int, typer.Option(help="Test-split documents for the extraction figures.")] = 50,
    tokens: Annotated[int, typer.Option(help="Random activations for the training-run figures.")] = 98_304,
    width: Annotated[int | None, typer.Option(help="d_model of those activations (default: the model's).")] = None,
    out: Annotated[str, typer.Option(help="JSON output.")] = "artifacts/bench.json",
    scaling: Annotated[
        bool, typer.Option(help="Also 2 processes against 1 (extract, train) and DDP's communication share.")
    ] = True,
    params: ParamsOption = DEFAULT_PARAMS_FILE,
    set_: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Speed as ratios measured in one run (bench/figures.py; from a checkout): prints a table and writes JSON."""

    def measure(p: Params) -> None:
        import tempfile

        from rich.table import Table

        from pipeline.core.atomic import write_json
        from pipeline.core.progress import console

        benchmarks = _checkout_module("bench.figures")

        with tempfile.TemporaryDirectory() as workdir:
            result = benchmarks.run(p, docs, tokens, width, Path(workdir), scaling)
        write_json(out, result)
        table = Table("figure", "value", "goal", title=f"pipeline bench ({result['device']})")
        for name, value in result["figures"].items():
            goal = benchmarks.GOALS.get(name)
            table.add_row(
                name,
                f"{value:.3f}",
                "" if goal is None else f"{'≤' if name in benchmarks.LOWER_IS_BETTER else '≥'} {goal}",
            )
        console.print(table)
        startup = Table("stage", "seconds", title="start-up: each stage on a run too small for its own work to count")
        for stage, seconds in result["details"]["startup_s"].items():
            startup.add_row(stage, f"{seconds:.2f}")
        console.print(startup)

    _run(["bench", "--docs", str(docs), "--tokens", str(tokens)], verbose, params, set_, measure)


@app.command("tiny-assets")
def tiny_assets(
    out: Annotated[str, typer.Argument(help="Directory to write model/ and gsm8k/ into.")] = "data/tiny",
    shape: Annotated[str, typer.Option(help="Model shape: tiny, or gpt2-small (for benchmarks).")] = "tiny",
    tokenizer: Annotated[str | None, typer.Option(help="GPT-2 BPE ranks (.tiktoken) for the real tokenizer.")] = None,
    train: Annotated[bool, typer.Option(help="Train the model on the train rows (a few minutes on CPU).")] = False,
    train_steps: Annotated[int, typer.Option(help="Training steps with --train (batches of 32 documents).")] = 600,
    dataset: Annotated[
        str | None, typer.Option(help="Real GSM8K rows instead of generated ones: a hub id or a local directory.")
    ] = None,
) -> None:
    """Write a tiny GPT-2 and GSM8K-format rows (what params-tiny.yaml runs on; offline, CPU)."""
    from pipeline.params import DataConfig
    from pipeline.sources import load_rows
    from pipeline.tiny import SHAPES, write_tiny_assets

    if shape not in SHAPES:
        print(f"error: unknown shape {shape!r}; choose from {', '.join(SHAPES)}", file=sys.stderr)
        raise typer.Exit(2)
    try:
        rows = None if dataset is None else {s: load_rows(DataConfig(dataset=dataset), s) for s in ("train", "test")}
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None
    paths = write_tiny_assets(
        Path(out), shape, Path(tokenizer) if tokenizer else None, rows=rows, train_steps=train_steps if train else 0
    )
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    if train:
        print((paths["model"] / "training.json").read_text().strip())


if __name__ == "__main__":
    app()
