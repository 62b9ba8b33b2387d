"""A label set: every token of a store's splits labelled by each task of pipeline/label/structure.py.

Labels are computed from the documents' text, then given to the store's tokens through the characters each spans
(pipeline/label/spans.py), so they are exact for any tokenizer: a token takes the one label its non-space
characters carry; a token whose characters carry several
(`=<<`: reasoning and annotation) is left unlabelled for that task and counted as mixed, as are whitespace tokens
and the BOS token. The set is a directory (`probe.labels`, beside the store):

    labels.json            tasks and their classes, per split the store's token fingerprint (`token_sha256`),
                           counts per class, mixed tokens, and what the documents hold (steps, annotations,
                           malformed annotations, ambiguous numbers); tasks no token has are listed as absent
    <split>.safetensors    per task an int8 label per token of the split, in store order (-1: unlabelled), and
                           per document its number of steps, its operations (bit i: "+-*/"[i]), its annotations
                           and its malformed annotations

A label set is keyed by the fingerprints: one made for other tokens (another corpus, tokenizer or extraction) is
refused, naming the command that remakes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from pipeline.core.atomic import atomic_path
from pipeline.core.errors import PipelineError
from pipeline.corpus import Document, TokenizedSplit
from pipeline.label.spans import MISMATCH, token_spans
from pipeline.label.structure import (
    DOCUMENT_COUNTS,
    OPERATORS,
    TASKS,
    OperationClasses,
    is_space,
    label_characters,
)
from pipeline.store.format import token_digest

LABELS_FILE = "labels.json"
FORMAT_VERSION = 1


@dataclass
class SplitLabels:
    """One split's labels: the packed tokens they belong to, per task a label per token, per document counts."""

    tokens: TokenizedSplit
    labels: dict[str, np.ndarray]  # task -> int8 [n_tokens]
    documents: dict[str, np.ndarray]  # DOCUMENT_COUNTS -> int32 [n_docs]
    mixed: dict[str, int]  # task -> tokens whose characters carry several labels
    ambiguous_numbers: int  # solution numbers whose value is both in the question and computed before


def label_split(
    documents: list[Document], tokens: TokenizedSplit, tokenizer, max_len: int, operations: OperationClasses
) -> SplitLabels:  # fmt: skip
    """Label every token of a split: `tokens` are the split's stored tokens (BOS + each document's, truncated to
    `max_len`), `documents` the rendered rows they came from (the first `tokens.n_docs` of them)."""
    if len(documents) < tokens.n_docs:
        raise PipelineError(f"{len(documents)} documents for a split of {tokens.n_docs}: {MISMATCH}")
    documents = documents[: tokens.n_docs]  # data.max_tokens may have kept the leading documents only
    found = label_characters(documents, operations)
    spans = token_spans([d.text for d in documents], found.codes, tokens, tokenizer, max_len)
    stacked = np.stack(list(found.chars.values()), axis=1)  # [n_chars, n_tasks]: one gather serves every task
    stacked[is_space(found.codes)] = -1
    values, mixed = _token_labels(stacked, spans)
    labels = {task: np.ascontiguousarray(values[:, i]) for i, task in enumerate(found.chars)}
    mixed_tokens = dict(zip(found.chars, mixed.tolist(), strict=True))
    return SplitLabels(tokens, labels, found.documents, mixed_tokens, found.ambiguous_numbers)


def _token_labels(chars: np.ndarray, spans: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per token and task, the one label its characters carry (-1 for none or several), and per task how many
    tokens carry several. `chars`: [n_chars, n_tasks] with n_tasks <= 8; `spans`: [n_tokens, 2]."""
    n_tasks = chars.shape[1]
    lengths = np.maximum(spans[:, 1] - spans[:, 0], 0)
    order = np.argsort(-lengths, kind="stable")  # longest first: the tokens still running at offset j lead
    starts, running = spans[order, 0], np.searchsorted(-lengths[order], -np.arange(lengths.max(initial=0)), "left")
    high = np.full((len(chars), 8), -1, dtype=np.int8)  # eight labels fill one int64: gathered as one value
    high[:, :n_tasks] = chars
    low = np.where(high < 0, np.iinfo(np.int8).max, high).astype(np.int8)  # -1 out of the minimum
    high, low = high.view(np.int64).ravel(), low.view(np.int64).ravel()
    highest = np.full((len(spans), 8), -1, dtype=np.int8)
    lowest = np.full_like(highest, np.iinfo(np.int8).max)
    for j, n in enumerate(running):  # the j-th character of every token longer than j, all at once
        np.maximum(highest[:n], high[starts[:n] + j].view(np.int8).reshape(n, 8), out=highest[:n])
        np.minimum(lowest[:n], low[starts[:n] + j].view(np.int8).reshape(n, 8), out=lowest[:n])
    highest, lowest = highest[:, :n_tasks], lowest[:, :n_tasks]
    labelled, single = highest >= 0, lowest == highest
    values = np.empty_like(highest)
    values[order] = np.where(labelled & single, highest, -1)
    return values, (labelled & ~single).sum(axis=0)


def write_label_set(path: str | Path, splits: dict[str, SplitLabels], operations: OperationClasses,
                    meta: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Write the label set directory whole (nothing half-written under its name); returns its labels.json."""
    tasks = final_classes(splits, operations)
    record = {
        "format_version": FORMAT_VERSION,
        **meta,
        "tasks": tasks,
        "absent": [task for task in tasks if not any((s.labels[task] >= 0).any() for s in splits.values())],
        "operators": OPERATORS,
        "splits": {name: _split_record(split, tasks) for name, split in splits.items()},
    }
    with atomic_path(path, owned=is_label_set) as tmp:
        tmp.mkdir()
        for name, split in splits.items():
            arrays = {f"token/{task}": values for task, values in split.labels.items()}
            arrays |= {f"document/{name}": split.documents[name] for name in DOCUMENT_COUNTS}
            save_file(arrays, str(tmp / f"{name}.safetensors"))
        (tmp / LABELS_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def final_classes(splits: dict[str, SplitLabels], operations: OperationClasses) -> dict[str, list[str]]:
    """Every task's classes, once every split is labelled: the operation classes (the operator sets met) are put
    in canonical order, and the splits' operation labels renumbered to match."""
    names, remap = operations.canonical()
    for split in splits.values():
        split.labels["operation"] = remap[split.labels["operation"]]
    return {task: list(names if task == "operation" else classes) for task, classes in TASKS.items()}


def _split_record(split: SplitLabels, tasks: dict[str, list[str]]) -> dict[str, Any]:
    documents = split.documents
    operations = documents["operations"]
    return {
        "token_sha256": token_digest(split.tokens.tokens, split.tokens.doc_offsets),
        "n_tokens": int(split.tokens.doc_offsets[-1]),
        "n_docs": split.tokens.n_docs,
        "class_tokens": {task: _class_counts(split.labels[task], classes) for task, classes in tasks.items()},
        "mixed_tokens": split.mixed,
        "documents_with_solution": int((documents["n_steps"] > 0).sum()),
        "steps": int(documents["n_steps"].sum()),
        "annotations": int(documents["n_annotations"].sum()),
        "malformed_annotations": int(documents["n_malformed"].sum()),
        "ambiguous_numbers": split.ambiguous_numbers,
        "documents_by_operation": {op: int((operations & (1 << i) > 0).sum()) for i, op in enumerate(OPERATORS)},
    }


def _class_counts(labels: np.ndarray, classes: list[str]) -> dict[str, int]:
    counts = np.bincount(labels[labels >= 0], minlength=len(classes)).tolist()
    return dict(zip(classes, counts, strict=True))


def is_label_set(path: Path) -> bool:
    """Whether `path` holds a label set (which a new one may replace)."""
    return (Path(path) / LABELS_FILE).is_file()


class LabelSet:
    """A written label set, read back; `check` refuses labels made for other tokens than a store's."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not is_label_set(self.path):
            raise PipelineError(f"no token labels at {self.path}; run `pipeline label` first")
        self.record = json.loads((self.path / LABELS_FILE).read_text())
        if self.record.get("format_version") != FORMAT_VERSION:
            raise PipelineError(f"{self.path} holds labels of another format; remake them with `pipeline label`")
        self.tasks: dict[str, list[str]] = self.record["tasks"]
        self._read: dict[str, dict[str, np.ndarray]] = {}

    @property
    def present(self) -> list[str]:
        """The tasks some token has a label for."""
        return [task for task in self.tasks if task not in self.record["absent"]]

    def check(self, store_fingerprints: dict[str, str], split: str) -> None:
        """Refuse labels whose tokens are not the store's for `split`."""
        ours = self.record["splits"].get(split, {}).get("token_sha256")
        if ours is None:
            raise PipelineError(f"{self.path} holds no labels for split {split!r}; run `pipeline label`")
        if ours != store_fingerprints.get(split):
            raise PipelineError(
                f"{self.path} labels other tokens than the store's {split!r} split (the corpus, tokenizer or "
                "extraction changed since they were made): run `pipeline label` again"
            )

    def tokens(self, split: str) -> dict[str, np.ndarray]:
        """Per task, the label of every token of `split` (-1: unlabelled)."""
        return self._arrays(split, "token/")

    def documents(self, split: str) -> dict[str, np.ndarray]:
        """Per-document counts of `split`: n_steps, operations (bit mask), n_annotations, n_malformed."""
        return self._arrays(split, "document/")

    def _arrays(self, split: str, kind: str) -> dict[str, np.ndarray]:
        if split not in self._read:  # one read of the split's file serves its tokens' and its documents' arrays
            self._read[split] = load_file(str(self.path / f"{split}.safetensors"))
        return {name.removeprefix(kind): a for name, a in self._read[split].items() if name.startswith(kind)}
