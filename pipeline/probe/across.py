"""One SAE's latents across reasoning tasks: which fire on both tasks with the same best label, and which are
task-specific (the reference report's "evaluate feature stability across different reasoning tasks").

The tasks are `probe.across` (document subsets, as `sae.<key>.documents` chooses them), taken on the probed split.
For every SAE and every task:
- each latent's firing frequency over the task's tokens (one pass over the split, BOS excluded);
- each latent's best label on the task: the problem (pipeline/probe/problems.py) it separates best, by AUROC, over
  the sampled tokens of the task's documents (a problem needs `min_positives` positives and others there).
For the first two tasks A and B, a latent is exactly one of
- rare: it fires on less than FIRING of either task's tokens;
- specific to A (or B): it fires on at least FIRING of A's, and on B at less than 1/SPECIFIC of that;
- shared: any other (it fires on one task at least, and on the other at no less than 1/SPECIFIC of that); shared
  with the same best label on both tasks, or with another.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from pipeline.probe.fit import latent_aurocs
from pipeline.probe.problems import HALVES, Problem
from pipeline.probe.sample import Sample
from pipeline.saes.base import SparseAutoencoder
from pipeline.train.loader import ActivationLoader

FIRING = 1e-3  # a latent fires on a task when it is active on at least this share of its tokens
SPECIFIC = 10.0  # ...and is specific to it when that share is this many times the other task's


def across_tasks(
    loader: ActivationLoader, saes: dict[str, SparseAutoencoder], read: Sample, found: list[Problem],
    tasks: dict[str, np.ndarray], token_documents: np.ndarray, min_positives: int, batch_tokens: int,
    on_tokens: Callable[[int], None] = lambda n: None,
) -> dict[str, dict]:  # fmt: skip
    """Per SAE key: per task its latents' frequencies and best labels, and the classes of latents between the
    first two tasks. `tasks`: name -> bool per document of the split; `token_documents`: each token's document."""
    frequency = _frequencies(loader, saes, tasks, token_documents, batch_tokens, on_tokens)
    results = {}
    for key in saes:
        per_task = {name: {"frequency": frequency[key][name].tolist(),
                           **_best_labels(read, key, found, chosen[token_documents], min_positives)}
                    for name, chosen in tasks.items()}  # fmt: skip
        first, second = list(tasks)[:2]
        results[key] = {"tasks": per_task, "latents": classify(per_task[first], per_task[second], first, second)}
    return results


def classify(a: dict, b: dict, name_a: str, name_b: str) -> dict[str, int]:
    """How many latents are shared (with the same best label on both tasks, or another), specific to one task,
    or rare; `a`, `b`: a task's frequencies and best labels per latent (None: none)."""
    fa, fb = np.asarray(a["frequency"]), np.asarray(b["frequency"])
    rare = (fa < FIRING) & (fb < FIRING)
    only_a = (fa >= FIRING) & (fb * SPECIFIC < fa)
    only_b = (fb >= FIRING) & (fa * SPECIFIC < fb)
    shared = ~rare & ~only_a & ~only_b
    same = shared & np.array([x is not None and x == y for x, y in zip(a["best_label"], b["best_label"],
                                                                        strict=True)], dtype=bool)  # fmt: skip
    return {
        "shared, same best label": int(same.sum()),
        "shared, another best label": int((shared & ~same).sum()),
        f"only {name_a}": int(only_a.sum()),
        f"only {name_b}": int(only_b.sum()),
        "rare": int(rare.sum()),
    }


def _frequencies(
    loader: ActivationLoader, saes: dict[str, SparseAutoencoder], tasks: dict[str, np.ndarray],
    token_documents: np.ndarray, batch_tokens: int, on_tokens: Callable[[int], None],
) -> dict[str, dict[str, np.ndarray]]:  # fmt: skip
    fired = {key: {name: torch.zeros(sae.d_sae, dtype=torch.float64) for name in tasks} for key, sae in saes.items()}
    tokens = dict.fromkeys(tasks, 0)
    for positions, block in loader.in_order(batch_tokens):
        documents = token_documents[positions.numpy()]
        members = {name: torch.from_numpy(chosen[documents]) for name, chosen in tasks.items()}
        for name, member in members.items():
            tokens[name] += int(member.sum())
        for key, sae in saes.items():
            source, _ = sae.input_and_target(block)
            with torch.no_grad():
                active = (sae.encode(source) > 0).cpu()
            for name, member in members.items():
                fired[key][name] += active[member].sum(dim=0)
        on_tokens(len(positions))
    return {key: {name: (fired[key][name] / max(tokens[name], 1)).numpy() for name in tasks} for key in saes}


def _best_labels(read: Sample, key: str, found: list[Problem], in_task: np.ndarray, min_positives: int) -> dict:
    """Each latent's best label over the sampled tokens of the task's documents, and that AUROC (None and -1
    where no problem has enough of both classes there)."""
    f = read.latents[key]
    aurocs, names = [], []
    for problem in found:
        tokens = np.concatenate([problem.tokens[half] for half in HALVES])
        positive = np.concatenate([problem.positive[half] for half in HALVES])
        keep = in_task[tokens]
        if min(int(positive[keep].sum()), int((~positive[keep]).sum())) < min_positives:
            continue
        aurocs.append(latent_aurocs(f[np.searchsorted(read.tokens, tokens[keep])], positive[keep]))
        names.append(problem.name)
    if not aurocs:
        return {"best_label": [None] * f.shape[1], "auroc": [-1.0] * f.shape[1]}
    table = np.stack(aurocs)
    best = table.argmax(axis=0)
    return {"best_label": [names[i] for i in best.tolist()],
            "auroc": [round(float(v), 4) for v in table[best, np.arange(table.shape[1])]]}  # fmt: skip
