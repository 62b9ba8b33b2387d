"""GSM8K rows -> documents (text) -> token ids with document offsets -> padded batches of similar length."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.core.errors import PipelineError, first_line
from pipeline.core.location import looks_local
from pipeline.params import DataConfig

REQUIRED_FIELDS = ("question", "answer")


@dataclass
class TokenizedSplit:
    """Every document of one split as one flat token array; document i is tokens[offsets[i]:offsets[i+1]]."""

    tokens: np.ndarray  # int32 [n_tokens]
    doc_offsets: np.ndarray  # int64 [n_docs + 1]
    n_truncated: int  # documents cut to the model's context length

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1


def load_documents(cfg: DataConfig, split: str) -> list[str]:
    """The split's rows rendered through `cfg.template` (keys: the row's fields, e.g. {question}, {answer})."""
    rows = load_rows(cfg, split)
    if cfg.max_docs is not None:
        rows = rows[: cfg.max_docs]
    try:
        return [cfg.template.format(**row) for row in rows]
    except KeyError as exc:
        raise PipelineError(f"data.template names field {exc} that GSM8K rows do not have") from exc


def tokenize(documents: list[str], tokenizer, bos_token_id: int, max_len: int) -> TokenizedSplit:
    """BOS + the document's tokens, truncated to `max_len` (the model's context)."""
    encoded = tokenizer(documents, add_special_tokens=False)["input_ids"]
    lengths = np.array([min(len(ids) + 1, max_len) for ids in encoded], dtype=np.int64)
    offsets = np.zeros(len(documents) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.empty(offsets[-1], dtype=np.int32)
    n_truncated = 0
    for i, ids in enumerate(encoded):
        start, end = offsets[i], offsets[i + 1]
        tokens[start] = bos_token_id
        tokens[start + 1 : end] = ids[: end - start - 1]
        n_truncated += len(ids) + 1 > max_len
    return TokenizedSplit(tokens=tokens, doc_offsets=offsets, n_truncated=n_truncated)


def load_rows(cfg: DataConfig, split: str) -> list[dict]:
    """The split's GSM8K rows (dicts with `question` and `answer`), from a local directory or the hub."""
    local = Path(cfg.dataset).expanduser()
    if looks_local(cfg.dataset):
        if not local.is_dir():
            raise PipelineError(f"data.dataset directory {local} does not exist")
        rows = _read_jsonl(local / f"{split}.jsonl")
    else:
        rows = _load_hub(cfg, split)
    if not rows:
        raise PipelineError(f"split {split!r} of {cfg.dataset} holds no rows")
    return rows


def _read_jsonl(path: Path) -> list[dict]:
    """Local GSM8K-format file; a malformed line is an error naming file and line."""
    if not path.is_file():
        found = sorted(p.name for p in path.parent.glob("*.jsonl"))
        raise PipelineError(f"split file {path} not found (the directory holds: {', '.join(found) or 'nothing'})")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PipelineError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
            missing = [k for k in REQUIRED_FIELDS if not isinstance(row, dict) or not isinstance(row.get(k), str)]
            if missing:
                raise PipelineError(f"{path}:{number}: missing or non-text field(s) {', '.join(missing)}")
            rows.append(row)
    return rows


def _load_hub(cfg: DataConfig, split: str) -> list[dict]:
    import datasets

    try:
        dataset = datasets.load_dataset(cfg.dataset, cfg.config, split=split)
    except Exception as exc:  # the hub client raises many types; all mean "could not get it"
        raise PipelineError(
            f"dataset {cfg.dataset!r} (config {cfg.config!r}, split {split!r}) could not be loaded: "
            f"{type(exc).__name__}: {first_line(exc)} (and there is no local directory "
            "of that name). Offline? Point data.dataset at a local directory holding {split}.jsonl files in GSM8K's "
            "format"
        ) from exc
    return [dict(row) for row in dataset]


@dataclass
class Batch:
    """Documents padded on the right into one [len(docs), width] forward pass."""

    docs: np.ndarray  # document indices
    width: int


def plan_batches(lengths: np.ndarray, doc_ids: np.ndarray, batch_tokens: int) -> list[Batch]:
    """Group documents of similar length so that padding stays small and no batch exceeds `batch_tokens`."""
    order = doc_ids[np.argsort(lengths[doc_ids], kind="stable")[::-1]]
    batches: list[Batch] = []
    current: list[int] = []
    width = 0
    for doc in order:
        length = int(lengths[doc])
        if current and max(width, length) * (len(current) + 1) > batch_tokens:
            batches.append(Batch(np.array(current), width))
            current, width = [], 0
        current.append(int(doc))
        width = max(width, length)
    if current:
        batches.append(Batch(np.array(current), width))
    return batches


def padded(batch: Batch, tokens: np.ndarray, offsets: np.ndarray, device: torch.device):
    """Token ids [n, width] (right-padded with 0) and the attention mask for `batch`, on `device`."""
    lengths = offsets[batch.docs + 1] - offsets[batch.docs]
    ids = np.zeros((len(batch.docs), batch.width), dtype=np.int64)
    for row, doc in enumerate(batch.docs):
        ids[row, : lengths[row]] = tokens[offsets[doc] : offsets[doc + 1]]
    mask = (np.arange(batch.width) < lengths[:, None]).astype(np.int64)
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
