"""Reasoning tasks as subsets of a split's documents, chosen by their solutions' structure (`sae.<key>.documents`).

A task is decided per document from the label set's per-document counts (pipeline/label/label_set.py): its
reasoning steps and the operations its well-formed annotations use. A document without a solution belongs to no
task that sets a criterion.
"""

from __future__ import annotations

import numpy as np

from pipeline.params import OPERATORS, DocumentsConfig


def selected(counts: dict[str, np.ndarray], task: DocumentsConfig) -> np.ndarray:
    """Per document (bool), whether it belongs to `task`; `counts`: a split's per-document label counts."""
    steps, used = counts["n_steps"], counts["operations"].astype(np.int64)
    keep = np.ones(len(steps), dtype=bool)
    if task.operations is not None:
        keep &= (used & ~_mask(task.operations)) == 0
    if task.any_operation is not None:
        keep &= (used & _mask(task.any_operation)) != 0
    if task.min_steps is not None:
        keep &= steps >= task.min_steps
    if task.max_steps is not None:
        keep &= steps <= task.max_steps
    if task != DocumentsConfig():
        keep &= steps > 0  # a document without a solution has no structure to choose it by
    return keep


def _mask(operators: list[str]) -> int:
    return sum(1 << OPERATORS.index(op) for op in operators)
