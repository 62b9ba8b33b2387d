"""The recommendation: which config to use, by a stated rule applied to the held-out metrics."""

from __future__ import annotations

TIE_MARGIN = 0.01  # scores closer than this count as tied, and the sparser config wins

RANKINGS = (  # (metric group, metric, what it means, must lie in [0, 1]): the first usable one decides
    ("splice", "ce_loss_score", "CE loss score (share of the zero-ablation's CE damage the SAE avoids)", True),
    ("splice", "kl_score", "KL score (share of the zero-ablation's KL damage the SAE avoids)", True),
    ("ground_truth", "f1", "ground-truth F1 (latents as detectors of their best-matching true feature)", True),
    ("reconstruction", "explained_variance", "held-out explained variance", False),
)


def recommend(metrics: dict[str, dict]) -> tuple[str | None, str]:
    """The rule, applied: the best score of the first ranking usable for every config; near-ties go to lower L0.

    A config whose latents are all dead or all dense is not a sparse dictionary and is never recommended. A score
    is usable only where it is defined (the ablation's effect is beyond noise) and, for CE/KL scores, in [0, 1].
    """
    candidates = {k: m for k, m in metrics.items() if not _degenerate(m["eval"]["reconstruction"])}
    if not candidates:
        return None, (
            "No recommendation: in every config all latents are dead or all are dense, so none is a sparse "
            "dictionary (see the warnings)."
        )

    def usable(ranking: tuple, m: dict) -> bool:
        value = (m["eval"].get(ranking[0]) or {}).get(ranking[1])
        return value is not None and (not ranking[3] or 0 <= value <= 1)

    group, metric, meaning, _ = next(r for r in RANKINGS if all(usable(r, m) for m in candidates.values()))
    scores = {k: m["eval"][group][metric] for k, m in candidates.items()}
    best = max(scores.values())
    tied = [k for k, s in scores.items() if best - s <= TIE_MARGIN]
    choice = min(tied, key=lambda k: candidates[k]["eval"]["reconstruction"]["l0"])
    excluded = sorted(set(metrics) - set(candidates))
    rule = (
        "Choose the config whose reconstruction costs the model least on the held-out split: the highest CE loss "
        "score, or where that is not usable for some config (undefined because zero-ablation's effect on the CE is "
        "within noise, or outside [0, 1]) the highest KL score; on synthetic data (no model to splice into) the "
        "highest ground-truth F1; failing those the highest explained variance. "
        f"Scores within {TIE_MARGIN} of the best are tied, and among them the sparsest (lowest held-out L0) wins. "
        "Configs whose latents are all dead or all dense are excluded"
        f"{' (here: ' + ', '.join(excluded) + ')' if excluded else ''}. Used here: {meaning}."
    )
    return choice, rule


def _degenerate(reconstruction: dict) -> bool:
    d_sae = reconstruction["d_sae"]
    return reconstruction["dead_latents"] == d_sae or reconstruction["dense_latents"] == d_sae
