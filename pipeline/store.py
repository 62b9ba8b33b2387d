"""The activation store format: the only module that knows zarr paths and attributes.

Layout (zarr v3 group; readable by any zarr v3 reader):

    <store>/zarr.json                      group attributes (see `STORE_ATTRS_DOC` in the README)
    <store>/<split>/tokens                 int32   [n_tokens]
    <store>/<split>/doc_offsets            int64   [n_docs + 1]; document i = tokens[o[i]:o[i+1]]
    <store>/<split>/<hook>                 float16 [n_tokens, d_model], one array per hook

Activation arrays are sharded along tokens (`shard_tokens` per shard file, the unit of writing and resuming)
with `chunk_tokens`-row chunks inside (the unit of reading). A store is built under `<store>.partial` and renamed
to its final name only when every shard is written; `progress.json` there records finished shards for --resume.
"""

from __future__ import annotations

import json
import queue
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.atomic import replace_dir, write_json
from pipeline.errors import PipelineError

FORMAT_VERSION = 1
PROGRESS_FILE = "progress.json"
# Attributes that decide a store's content: --resume refuses when any differs.
IDENTITY_KEYS = (
    "format_version", "model", "model_revision", "process_weights", "compute_dtype", "hooks", "dtype",
    "tokenizer", "bos_token_id", "template", "dataset", "dataset_config", "splits", "max_docs",
    "shard_tokens", "chunk_tokens", "d_model", "n_ctx",
)  # fmt: skip


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


class StoreWriter:
    """Builds a store under `<path>.partial`, one whole shard at a time, then renames it into place."""

    def __init__(self, path: str | Path, attrs: dict[str, Any], resume: bool) -> None:
        self.path = Path(path)
        self.partial = partial_path(self.path)
        if self.path.exists() and not self.path.is_dir():
            raise PipelineError(f"output path {self.path} exists and is a file, not a store directory")
        self.attrs = {"format_version": FORMAT_VERSION, **attrs}
        # A partial store killed before its first progress record holds nothing worth keeping: start over.
        if resume and (self.partial / PROGRESS_FILE).is_file() and (self.partial / "zarr.json").is_file():
            self.group = zarr.open_group(self.partial, mode="r+", zarr_format=3)
            _refuse_if_different(dict(self.group.attrs), self.attrs, self.partial)
            self.done = {k: set(v) for k, v in json.loads((self.partial / PROGRESS_FILE).read_text()).items()}
        else:
            shutil.rmtree(self.partial, ignore_errors=True)
            self.partial.parent.mkdir(parents=True, exist_ok=True)
            self.group = zarr.open_group(self.partial, mode="w", zarr_format=3, attributes=self.attrs)
            self.done = {}
            self._save_progress()

    def add_split(self, split: str, tokens: np.ndarray, doc_offsets: np.ndarray) -> None:
        """Create the split's arrays (tokens and offsets written now; activations shard by shard)."""
        if split in self.group:
            return  # resumed: already created, with identical parameters
        shard, chunk, d_model = self.attrs["shard_tokens"], self.attrs["chunk_tokens"], self.attrs["d_model"]
        group = self.group.create_group(split)
        group.create_array("tokens", data=tokens.astype(np.int32), chunks=(shard,))
        group.create_array("doc_offsets", data=doc_offsets.astype(np.int64), chunks=(max(len(doc_offsets), 1),))
        for hook in self.attrs["hooks"]:
            group.create_array(
                hook,
                shape=(len(tokens), d_model),
                dtype=self.attrs["dtype"],
                chunks=(chunk, d_model),
                shards=(shard, d_model),
                compressors=None,  # fp16 activations barely compress; measured in the README
            )
        self.done.setdefault(split, set())
        self._save_progress()

    def pending_shards(self, split: str) -> list[tuple[int, int, int]]:
        """(index, first token, end token) of every shard of `split` not yet written."""
        n_tokens = self.group[split]["tokens"].shape[0]
        size = self.attrs["shard_tokens"]
        return [
            (i, start, min(start + size, n_tokens))
            for i, start in enumerate(range(0, n_tokens, size))
            if i not in self.done[split]
        ]

    def write_shard(self, split: str, index: int, start: int, activations: dict[str, np.ndarray]) -> None:
        """Write one whole shard of every hook, then record it as done."""
        for hook, values in activations.items():
            self.group[split][hook][start : start + len(values)] = values
        self.done[split].add(index)
        self._save_progress()

    def finalize(self, extra_attrs: dict[str, Any]) -> None:
        """Record the summary attributes and move the finished store under its final name."""
        self.group.attrs.update(extra_attrs)
        (self.partial / PROGRESS_FILE).unlink()
        replace_dir(self.partial, self.path)

    def _save_progress(self) -> None:
        write_json(self.partial / PROGRESS_FILE, {k: sorted(v) for k, v in self.done.items()})


class BackgroundWriter:
    """Writes shards on a thread so that the model never waits on the disk; errors surface on the next call."""

    def __init__(self, writer: StoreWriter, max_pending: int = 2) -> None:
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="store-writer")
        self.thread.start()

    def submit(self, split: str, index: int, start: int, activations: dict[str, np.ndarray]) -> None:
        self._raise_if_failed()
        self.queue.put((split, index, start, activations))

    def close(self) -> None:
        """Wait until every submitted shard is on disk."""
        self.queue.put(None)
        self.thread.join()
        self._raise_if_failed()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.writer.write_shard(*item)
                except BaseException as exc:  # kept and re-raised in the producer's thread
                    self.error = exc

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise PipelineError(f"writing the store failed: {self.error}") from self.error


class ActivationStore:
    """Read access to a finished store."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            hint = " (an interrupted extraction is there: run `pipeline extract --resume`)"
            raise PipelineError(
                f"no activation store at {self.path}{hint if partial_path(self.path).exists() else ''}; "
                "run `pipeline extract` first"
            )
        self.group = zarr.open_group(self.path, mode="r", zarr_format=3)
        self.attrs: dict[str, Any] = dict(self.group.attrs)
        if self.attrs.get("format_version") != FORMAT_VERSION:
            raise PipelineError(f"{self.path}: store format {self.attrs.get('format_version')} is not supported")

    @property
    def splits(self) -> list[str]:
        return list(self.attrs["splits"])

    @property
    def hooks(self) -> list[str]:
        return list(self.attrs["hooks"])

    @property
    def d_model(self) -> int:
        return int(self.attrs["d_model"])

    def tokens(self, split: str) -> np.ndarray:
        return self._split(split)["tokens"][:]

    def doc_offsets(self, split: str) -> np.ndarray:
        return self._split(split)["doc_offsets"][:]

    def activations(self, split: str, hook: str) -> zarr.Array:
        """The [n_tokens, d_model] array of one hook (lazy: index it to read)."""
        if hook not in self.hooks:
            raise PipelineError(f"hook {hook!r} is not in store {self.path}; it holds: {', '.join(self.hooks)}")
        return self._split(split)[hook]

    def _split(self, split: str) -> zarr.Group:
        if split not in self.splits:
            raise PipelineError(f"split {split!r} is not in store {self.path}; it holds: {', '.join(self.splits)}")
        return self.group[split]


def _refuse_if_different(found: dict[str, Any], wanted: dict[str, Any], where: Path) -> None:
    differing = [k for k in IDENTITY_KEYS if _normalise(found.get(k)) != _normalise(wanted.get(k))]
    if differing:
        details = "; ".join(f"{k}: store has {found.get(k)!r}, params say {wanted.get(k)!r}" for k in differing)
        raise PipelineError(f"cannot --resume {where}: it was written with different parameters ({details})")


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(value))
