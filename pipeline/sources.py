"""Where documents come from: a hub dataset or local files (jsonl, json, parquet, txt), split and located.

A local `data.dataset` directory holds each split as `{split}.{ext}`, `{split}-*.{ext}` or `{split}/*.{ext}`.
With `data.test_fraction`, the second split of `data.splits` is not read but held out from the first, a seeded
choice of whole documents, and the first split is every data file of the directory when none is named after it.
Every row keeps where it came from (file and line or row), so that an error can name it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError, first_line
from pipeline.core.location import looks_local
from pipeline.params import DataConfig

FORMATS = ("jsonl", "json", "parquet", "txt")


@dataclass
class Rows:
    """A split's rows (dicts of fields) and, for each, where it came from."""

    rows: list[dict]
    where: list[str]

    def take(self, indices) -> Rows:
        return Rows([self.rows[i] for i in indices], [self.where[i] for i in indices])


def load_rows(cfg: DataConfig, split: str) -> list[dict]:
    """The rows of `split` (dicts of fields)."""
    return read_split(cfg, split).rows


def read_split(cfg: DataConfig, split: str) -> Rows:
    """`split`'s rows: read, or held out from the first split (`data.test_fraction`); at most `data.max_docs`."""
    if cfg.test_fraction is None or split not in cfg.splits[:2]:
        rows = _read(cfg, split)
    else:
        source = _read(cfg, cfg.splits[0])
        held_out = _held_out(len(source.rows), cfg.test_fraction, cfg.split_seed)
        keep = held_out if split == cfg.splits[1] else np.setdiff1d(np.arange(len(source.rows)), held_out)
        rows = source.take(keep)
    if not rows.rows:
        raise PipelineError(f"split {split!r} of {cfg.dataset} holds no rows")
    return rows if cfg.max_docs is None else rows.take(range(min(cfg.max_docs, len(rows.rows))))


def _held_out(n_docs: int, fraction: float, seed: int) -> np.ndarray:
    """Indices (ascending) of round(fraction * n_docs) documents chosen with `seed`."""
    chosen = np.random.default_rng(seed).permutation(n_docs)[: round(fraction * n_docs)]
    return np.sort(chosen)


def _read(cfg: DataConfig, split: str) -> Rows:
    if not looks_local(cfg.dataset):
        return _read_hub(cfg, split)
    directory = Path(cfg.dataset).expanduser()
    if not directory.is_dir():
        raise PipelineError(f"data.dataset directory {directory} does not exist")
    files = split_files(directory, split)
    if not files and cfg.test_fraction is not None:  # a corpus of one split: every data file in the directory
        files = sorted(p for ext in FORMATS for p in directory.glob(f"*.{ext}"))
    if not files:
        found = sorted(p.name for ext in FORMATS for p in directory.glob(f"*.{ext}"))
        raise PipelineError(
            f"split {split!r}: no {split}.jsonl (or .json, .parquet, .txt, {split}-*.*, {split}/*) in {directory} "
            f"(it holds: {', '.join(found) or 'no data files'}); a dataset with one split can hold out a part of "
            "it with data.test_fraction"
        )
    rows = Rows([], [])
    for path in files:
        found = READERS[path.suffix[1:]](path)
        rows.rows += found.rows
        rows.where += found.where
    return rows


def split_files(directory: Path, split: str) -> list[Path]:
    """The data files of `split` in `directory`, in name order."""
    patterns = [f"{split}.{ext}" for ext in FORMATS] + [f"{split}-*.{ext}" for ext in FORMATS]
    patterns += [f"{split}/*.{ext}" for ext in FORMATS]
    return sorted({path for pattern in patterns for path in directory.glob(pattern) if path.is_file()})


def _read_jsonl(path: Path) -> Rows:
    """One JSON object a line; a malformed line is an error naming file and line."""
    rows = Rows([], [])
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PipelineError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
            _check_object(row, f"{path}:{number}")
            rows.rows.append(row)
            rows.where.append(f"{path}:{number}")
    return rows


def _read_json(path: Path) -> Rows:
    """A JSON array of objects."""
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
    if not isinstance(found, list):
        raise PipelineError(f"{path}: expected a JSON array of objects (one per row), found a {type(found).__name__}")
    where = [f"{path} row {i}" for i in range(len(found))]
    for row, place in zip(found, where, strict=True):
        _check_object(row, place)
    return Rows(found, where)


def _read_parquet(path: Path) -> Rows:
    import pyarrow.parquet

    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow's errors for a damaged or foreign file have several types
        raise PipelineError(f"{path}: not a readable parquet file ({first_line(exc)})") from exc
    return Rows(rows, [f"{path} row {i}" for i in range(len(rows))])


def _read_txt(path: Path) -> Rows:
    """The whole file is one document, in the field `text`."""
    return Rows([{"text": path.read_text(encoding="utf-8")}], [str(path)])


READERS = {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet, "txt": _read_txt}


def _check_object(row, where: str) -> None:
    if not isinstance(row, dict):
        raise PipelineError(f"{where}: expected a JSON object with the row's fields, found {type(row).__name__}")


def _read_hub(cfg: DataConfig, split: str) -> Rows:
    import datasets

    try:
        dataset = datasets.load_dataset(cfg.dataset, cfg.config, split=split)
    except Exception as exc:  # the hub client raises many types; all mean "could not get it"
        raise PipelineError(
            f"dataset {cfg.dataset!r} (config {cfg.config!r}, split {split!r}) could not be loaded: "
            f"{type(exc).__name__}: {first_line(exc)} (and there is no local directory "
            "of that name). Offline? Point data.dataset at a local directory of .jsonl, .json, .parquet or .txt "
            "files (docs/params.md)"
        ) from exc
    return Rows([dict(row) for row in dataset], [f"{cfg.dataset} {split} row {i}" for i in range(len(dataset))])
