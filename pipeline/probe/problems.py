"""What is probed: one-vs-rest binary problems over the token labels, on two halves of a split's documents.

Every class of a label task is a problem (a two-class task, such as number, is one problem: its second class
against its first), as SAEBench makes each class of a dataset a one-vs-all problem. Its tokens are those the task
labels; its positives those of the class. The split's documents are cut in two halves by a seeded permutation:
probes fit on the fit half and are scored on the other, so that no document is seen by both. A problem is probed
when each half holds at least `min_positives` positives and as many negatives; each half's sample is balanced (at
most `max_per_class` positives and the same number of negatives, drawn with the seed), so that chance is 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HALVES = ("fit", "score")


@dataclass
class Problem:
    task: str
    label: str  # the positive class
    tokens: dict[str, np.ndarray]  # half -> sampled token positions (ascending)
    positive: dict[str, np.ndarray]  # half -> bool per sampled token

    @property
    def name(self) -> str:
        return f"{self.task}={self.label}"


def document_halves(n_docs: int, seed: int) -> np.ndarray:
    """Per document, its half (0: fit, 1: score): half of the documents each, chosen with `seed`."""
    in_score = np.zeros(n_docs, dtype=np.int8)
    in_score[np.random.default_rng(seed).permutation(n_docs)[: n_docs // 2]] = 1
    return in_score


def problems(
    labels: dict[str, np.ndarray], classes: dict[str, list[str]], halves: np.ndarray, min_positives: int,
    max_per_class: int, seed: int,
) -> tuple[list[Problem], list[dict]]:  # fmt: skip
    """The problems that can be probed, each with its balanced samples, and those that cannot (with why).
    `halves`: per token, its document's half."""
    rng = np.random.default_rng(seed)
    found, skipped = [], []
    for task, values in labels.items():
        names = classes[task]
        for index in range(1, 2) if len(names) == 2 else range(len(names)):
            problem, why = _sampled(task, names[index], values, index, halves, min_positives, max_per_class, rng)
            if problem is None:
                skipped.append({"task": task, "class": names[index], "why": why})
            else:
                found.append(problem)
    return found, skipped


def _sampled(
    task: str, label: str, values: np.ndarray, index: int, halves: np.ndarray, min_positives: int,
    max_per_class: int, rng: np.random.Generator,
) -> tuple[Problem | None, str]:  # fmt: skip
    tokens, positive = {}, {}
    for half, name in enumerate(HALVES):
        where = halves == half
        pos = np.flatnonzero(where & (values == index))
        neg = np.flatnonzero(where & (values >= 0) & (values != index))
        n = min(len(pos), len(neg), max_per_class)
        if n < min_positives:
            return None, f"{len(pos)} positive and {len(neg)} other tokens in the {name} half (needs {min_positives})"
        chosen = np.concatenate([rng.choice(pos, n, replace=False), rng.choice(neg, n, replace=False)])
        order = np.argsort(chosen)
        tokens[name], positive[name] = chosen[order], (np.arange(2 * n) < n)[order]
    return Problem(task, label, tokens, positive), ""
