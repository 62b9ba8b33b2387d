"""The probes of one problem (pipeline/probe/problems.py), fit on its fit half and scored on its score half.

- dense: a logistic regression (scikit-learn; features standardized on the fit half, L2 with C = 1) on the
  activations x: the ceiling of what a linear read-out finds. The same fitted probe is then applied to an SAE's
  reconstruction x_hat: what the SAE keeps of that information (a transcoder's x and x_hat are its target and
  its prediction).
- sparse (SAEBench's sparse probing): the k latents whose mean activation differs most between the classes on
  the fit half (|mean over positives - mean over negatives|), then a logistic regression on those k alone (L2,
  C = 1, max_iter 1000, raw activations), as SAEBench's `get_top_k_mean_diff_mask` and `train_sklearn_probe` do;
  the same on the model's own dimensions is SAEBench's `llm_top_k`.
- per latent, its AUROC on the problem (the latent alone as a score, both halves): the probability that a random
  positive token's activation exceeds a random negative one's, ties counting half. Latents never fire below 0
  in any architecture here, so a latent that never fires scores 0.5.

Accuracies are on balanced samples: 0.5 is chance.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import scipy.sparse
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.probe.problems import HALVES, Problem
from pipeline.probe.sample import Sample

MAX_ITER = 1000  # SAEBench's (scikit-learn's default, 100, warns of convergence on activations)

Features = np.ndarray | scipy.sparse.csr_array


def dense_probe(x: np.ndarray, y: np.ndarray) -> Pipeline:
    """A logistic regression on standardized features, fit on (x, y)."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=MAX_ITER))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a separable problem stops at max_iter: fine
        return probe.fit(x, y)


def accuracy(probe, x: Features, y: np.ndarray) -> float:
    return float((probe.predict(x) == y).mean())


def sparse_probing(
    fit: Features, y_fit: np.ndarray, score: Features, y_score: np.ndarray, ks: list[int]
) -> dict[int, tuple[float, list[int]]]:
    """SAEBench's k-sparse probe for each k: test accuracy and the k features it read (best first)."""
    difference = np.abs(_mean(fit[y_fit]) - _mean(fit[~y_fit]))
    ranked = np.argsort(-difference, kind="stable")
    results = {}
    for k in ks:
        chosen = ranked[: min(k, fit.shape[1])]
        probe = LogisticRegression(C=1.0, max_iter=MAX_ITER)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            probe.fit(_columns(fit, chosen), y_fit)
        results[k] = (accuracy(probe, _columns(score, chosen), y_score), chosen.tolist())
    return results


def latent_aurocs(f: scipy.sparse.csr_array, positive: np.ndarray) -> np.ndarray:
    """Each latent's AUROC for `positive` over the rows of `f` (activations >= 0, stored sparse): exact, ties
    counting half, from the nonzero entries alone (every stored zero ties with every other)."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    coo = f.tocoo()
    rows, cols, values = coo.row, coo.col, coo.data
    keep = values > 0
    rows, cols, values = rows[keep], cols[keep], values[keep]
    is_pos = positive[rows]
    order = np.lexsort((values, cols))  # by latent, then by activation
    cols, values, is_pos = cols[order], values[order], is_pos[order]
    width = f.shape[1]
    neg_firing = np.bincount(cols[~is_pos], minlength=width)  # negatives each latent fires on
    pos_firing = np.bincount(cols[is_pos], minlength=width)
    silent_neg = n_neg - neg_firing  # negatives at 0: below every firing positive
    # Negatives below each entry within its latent, and negatives tied with it (same latent, same value).
    tie = np.flatnonzero(np.concatenate([[True], (cols[1:] != cols[:-1]) | (values[1:] != values[:-1])]))
    tie_of = np.repeat(np.arange(len(tie)), np.diff(np.append(tie, len(cols))))
    neg_cum = np.concatenate([[0], np.cumsum(~is_pos)])
    latent_start = np.searchsorted(cols, np.arange(width))
    below = neg_cum[tie[tie_of]] - neg_cum[latent_start[cols]]
    tied = neg_cum[np.append(tie, len(cols))[tie_of + 1]] - neg_cum[tie[tie_of]]
    wins = np.bincount(cols[is_pos], weights=(silent_neg[cols] + below + 0.5 * tied)[is_pos], minlength=width)
    wins += (n_pos - pos_firing) * 0.5 * silent_neg  # silent positives tie with silent negatives
    return wins / max(n_pos * n_neg, 1)


def _mean(x: Features) -> np.ndarray:
    return np.asarray(x.mean(axis=0)).ravel()


def _columns(x: Features, columns: np.ndarray) -> np.ndarray:
    chosen = x[:, columns]
    return chosen.toarray() if scipy.sparse.issparse(chosen) else chosen


def probe_problems(
    found: list[Problem], read: Sample, ks: list[int], on_problem: Callable[[int], None] = lambda n_tokens: None
) -> dict[str, dict]:
    """Every problem's probes for every config of one hook; per config its problems and per-latent AUROCs."""
    per_key = {key: {"problems": [], "aurocs": []} for key in read.latents}
    for problem in found:
        rows = {half: np.searchsorted(read.tokens, problem.tokens[half]) for half in HALVES}
        y = problem.positive
        probe = dense_probe(read.x[rows["fit"]], y["fit"])
        on_x = accuracy(probe, read.x[rows["score"]], y["score"])
        llm_sparse = sparse_probing(read.x[rows["fit"]], y["fit"], read.x[rows["score"]], y["score"], ks)
        both, both_y = np.concatenate([rows["fit"], rows["score"]]), np.concatenate([y["fit"], y["score"]])
        for key, f in read.latents.items():
            on_x_hat = accuracy(probe, read.x_hat[key][np.searchsorted(read.score_rows, rows["score"])], y["score"])
            sparse = sparse_probing(f[rows["fit"]], y["fit"], f[rows["score"]], y["score"], ks)
            aurocs = latent_aurocs(f[both], both_y)
            best = np.argsort(-aurocs, kind="stable")[:5]
            per_key[key]["problems"].append({
                "task": problem.task, "class": problem.label,
                "tokens": {half: len(rows[half]) for half in HALVES},
                "dense": {"x": on_x, "x_hat": on_x_hat},
                "sparse": {str(k): {"accuracy": acc, "latents": chosen} for k, (acc, chosen) in sparse.items()},
                "llm_sparse": {str(k): {"accuracy": acc, "dims": chosen} for k, (acc, chosen) in llm_sparse.items()},
                "best_latents": [{"latent": int(i), "auroc": float(aurocs[i])} for i in best],
            })  # fmt: skip
            per_key[key]["aurocs"].append(aurocs)
        on_problem(len(both))
    return per_key
