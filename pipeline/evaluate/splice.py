"""The cost of splicing SAEs into the model: CE and KL with the hook's activations replaced.

Splice scores: CE loss score (CE_zero - CE_sae) / (CE_zero - CE_clean), KL score (KL_zero - KL_sae) / KL_zero,
where the hook's activations are replaced by the reconstruction (sae) or by zeros (zero), under two conventions
computed in the same passes (see CONVENTIONS):
- ours: BOS positions are never replaced, by the SAE or by zeros; CE and KL over every prediction a document
  makes (positions 0..L-2, the prediction made at BOS included).
- saelens (SAELens's run_evals with ignore_tokens={bos, eos, pad}, as SAEBench's core eval calls it): the SAE
  replaces all but BOS, zero-ablation zeroes every position, BOS included; CE over the predictions made at
  positions 1..L-2, KL over positions 1..L-1. It costs one more forward pass per batch (zeroing BOS too),
  shared by all SAEs: 6 passes instead of 5 for three SAEs.
A score is undefined (None) when its denominator is within noise: it must exceed both MIN_ABLATION_EFFECT_NATS
and three standard errors of its per-token mean. Otherwise zero-ablation barely hurts the model (e.g. random
weights), and "share of the ablation's damage recovered" divides by noise.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from pipeline.core.errors import PipelineError
from pipeline.corpus import padded, plan_batches

Reconstruct = Callable[[torch.Tensor], torch.Tensor]
# Below 0.1 nats (a 10% change in perplexity), zeroing the hook barely matters to the model, and a score relative
# to so small an effect turns noise and rounding into large swings. On real GPT-2 small the effect is several nats.
MIN_ABLATION_EFFECT_NATS = 0.1
STANDARD_ERRORS = 3.0


CONVENTIONS = ("ours", "saelens")


def splice_scores(
    model,
    tokens: np.ndarray,
    offsets: np.ndarray,
    hook: str,
    reconstructions: dict[str, Reconstruct],
    batch_tokens: int,
    on_batch: Callable[[int], None] = lambda n_tokens: None,
    source_hook: str | None = None,
) -> dict[str, dict]:
    """Per entry of `reconstructions`: CE and KL of the model with `hook` replaced by it, by zeros, and untouched.

    Returns our convention's values, with SAELens's under "saelens_compatible". The clean and zero-ablated passes
    do not depend on the SAE, so each batch runs them once for all SAEs. Transcoders (`source_hook`): `hook` is
    their target, replaced by their prediction from the same pass's `source_hook` activation (an earlier hook).
    """
    device = next(model.parameters()).device
    lengths = np.diff(offsets)
    totals = {convention: _Totals(list(reconstructions)) for convention in CONVENTIONS}
    for batch in plan_batches(lengths, np.arange(len(lengths)), batch_tokens):
        ids, mask = padded(batch, tokens, offsets, device)
        rows = _positions(ids, mask)
        clean = _Clean(_log_probs(model, ids, mask, hook, None), rows["targets"])
        for convention, zero_bos in (("ours", False), ("saelens", True)):
            zero = clean.per_token(_log_probs(model, ids, mask, hook, torch.zeros_like, replace_bos=zero_bos))
            totals[convention].add_reference(clean.nll, zero, rows[convention])
        for key, reconstruct in reconstructions.items():
            spliced = clean.per_token(_log_probs(model, ids, mask, hook, reconstruct, source_hook=source_hook))
            for convention in CONVENTIONS:
                totals[convention].add_sae(key, spliced, rows[convention])
        on_batch(int(mask.sum()))
    results = {}
    for key in reconstructions:
        ours = totals["ours"].scores(key, len(lengths))
        saelens = totals["saelens"].scores(key, len(lengths))
        # The noise flags would repeat ours; a SAELens score outside [0, 1] is news of its own.
        saelens["flags"] = _out_of_range(saelens, "saelens_compatible.")
        ours["flags"] += saelens["flags"]
        results[key] = {**ours, "saelens_compatible": saelens}
    return results


def _positions(ids: torch.Tensor, mask: torch.Tensor) -> dict[str, object]:
    """Which real positions each convention counts, as boolean masks over the batch's real positions (flattened).

    A document of L tokens has real positions 0..L-1 (0 is BOS); the prediction made at position p is of p + 1.
    """
    real = mask.bool()
    has_next = torch.zeros_like(real)
    has_next[:, :-1] = real[:, 1:]
    next_ids = torch.zeros_like(ids)
    next_ids[:, :-1] = ids[:, 1:]
    after_bos = (torch.arange(ids.shape[1], device=ids.device) >= 1).expand_as(real)
    predicts, not_bos = has_next[real], after_bos[real]
    return {
        "targets": next_ids[real],
        "ours": (predicts, predicts),  # (CE rows, KL rows): positions 0..L-2
        "saelens": (predicts & not_bos, not_bos),  # CE: 1..L-2, KL: 1..L-1
    }


class _Clean:
    """A batch's clean next-token distribution, and the per-position CE and KL of another pass against it.

    CE and KL are computed once at every real position of a pass (never on copies of the [positions, vocab] rows
    each convention selects); each convention then sums its own positions. KL(clean || p) is what
    F.kl_div(log p, log clean, log_target=True) sums: exp(log clean) * (log clean - log p), exp taken once.
    """

    def __init__(self, log_probs: torch.Tensor, targets: torch.Tensor) -> None:
        self.log_probs, self.targets = log_probs, targets
        self.probs = log_probs.exp()
        self.nll = self._nll(log_probs)

    def per_token(self, log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(CE, KL(clean || it)) at every real position of a pass, in float64."""
        kl = torch.sub(self.log_probs, log_probs).mul_(self.probs).sum(-1)
        return self._nll(log_probs), kl.double()

    def _nll(self, log_probs: torch.Tensor) -> torch.Tensor:
        return -log_probs.gather(1, self.targets[:, None]).squeeze(1).double()


class _Totals:
    """Float64 sums of per-token CE and KL under one convention, for the reference passes and each SAE."""

    def __init__(self, keys: list[str]) -> None:
        self.sums = dict.fromkeys(("ce_clean", "ce_zero", "kl_zero", "ce_gap_sq", "kl_zero_sq"), 0.0)
        self.n_ce = self.n_kl = 0
        self.per_sae = {key: {"ce_sae": 0.0, "kl_sae": 0.0} for key in keys}

    def add_reference(self, nll_clean: torch.Tensor, zero: tuple[torch.Tensor, torch.Tensor], rows: tuple) -> None:
        ce_rows, kl_rows = rows
        ce_clean = nll_clean[ce_rows]
        ce_gap = zero[0][ce_rows] - ce_clean
        kl_zero = zero[1][kl_rows]
        self.sums["ce_clean"] += ce_clean.sum().item()
        self.sums["ce_zero"] += (ce_clean + ce_gap).sum().item()
        self.sums["kl_zero"] += kl_zero.sum().item()
        self.sums["ce_gap_sq"] += ce_gap.pow(2).sum().item()
        self.sums["kl_zero_sq"] += kl_zero.pow(2).sum().item()
        self.n_ce += int(ce_rows.sum())
        self.n_kl += int(kl_rows.sum())

    def add_sae(self, key: str, spliced: tuple[torch.Tensor, torch.Tensor], rows: tuple) -> None:
        ce_rows, kl_rows = rows
        self.per_sae[key]["ce_sae"] += spliced[0][ce_rows].sum().item()
        self.per_sae[key]["kl_sae"] += spliced[1][kl_rows].sum().item()

    def scores(self, key: str, n_docs: int) -> dict:
        """Mean CE/KL and the scores; a score is None (undefined) when zero-ablation's effect is within noise."""
        n_ce, n_kl = max(self.n_ce, 1), max(self.n_kl, 1)
        means = {"ce_clean": self.sums["ce_clean"] / n_ce, "ce_zero": self.sums["ce_zero"] / n_ce,
                 "kl_zero": self.sums["kl_zero"] / n_kl, "ce_sae": self.per_sae[key]["ce_sae"] / n_ce,
                 "kl_sae": self.per_sae[key]["kl_sae"] / n_kl}  # fmt: skip
        ce_gap = means["ce_zero"] - means["ce_clean"]
        ce_gap_se = _standard_error(self.sums["ce_gap_sq"] / n_ce, ce_gap, n_ce)
        kl_zero_se = _standard_error(self.sums["kl_zero_sq"] / n_kl, means["kl_zero"], n_kl)
        ce_defined = ce_gap > max(MIN_ABLATION_EFFECT_NATS, STANDARD_ERRORS * ce_gap_se)
        kl_defined = means["kl_zero"] > max(MIN_ABLATION_EFFECT_NATS, STANDARD_ERRORS * kl_zero_se)
        scores = {
            "ce_loss_score": (means["ce_zero"] - means["ce_sae"]) / ce_gap if ce_defined else None,
            "kl_score": (means["kl_zero"] - means["kl_sae"]) / means["kl_zero"] if kl_defined else None,
        }
        return {
            **means,
            **scores,
            "ce_delta": means["ce_sae"] - means["ce_clean"],
            "ce_ablation_effect": ce_gap,
            "ce_ablation_effect_standard_error": ce_gap_se,
            "kl_zero_standard_error": kl_zero_se,
            "min_ablation_effect_nats": MIN_ABLATION_EFFECT_NATS,
            "standard_errors": STANDARD_ERRORS,
            "n_docs": n_docs,
            "n_ce_tokens": self.n_ce,
            "n_kl_tokens": self.n_kl,
            "flags": _flags(scores, ce_gap, ce_gap_se, ce_defined, means["kl_zero"], kl_zero_se, kl_defined),
        }


def _out_of_range(scores: dict, prefix: str = "") -> list[str]:
    return [
        f"{prefix}{name} {scores[name]:.3f} is outside [0, 1]"
        for name in ("ce_loss_score", "kl_score")
        if scores[name] is not None and not 0 <= scores[name] <= 1
    ]


def _flags(scores: dict, ce_gap: float, ce_se: float, ce_ok: bool, kl_zero: float, kl_se: float, kl_ok: bool):
    flags = _out_of_range(scores)
    for name, what, effect, se, defined in (
        ("ce_loss_score", "CE", ce_gap, ce_se, ce_ok),
        ("kl_score", "KL", kl_zero, kl_se, kl_ok),
    ):
        if not defined:
            flags.append(
                f"{name} undefined: zero-ablation changes {what} by {effect:.4f} nats (± {se:.4f}), "
                f"below the {MIN_ABLATION_EFFECT_NATS} nats / {STANDARD_ERRORS:g} standard errors needed"
            )
    return flags


def _standard_error(mean_square: float, mean: float, n: int) -> float:
    """Standard error of a mean, from the mean and the mean square of n values."""
    return max(mean_square - mean * mean, 0.0) ** 0.5 / max(n - 1, 1) ** 0.5


def transcoder_hooks(source_hook: str, target_hook: str, predict: Reconstruct, replace_bos: bool = False) -> list:
    """TransformerLens forward hooks that replace `target_hook` by `predict` of the same pass's `source_hook`
    activation (which the model computes first), BOS untouched unless `replace_bos`."""
    seen: dict[str, torch.Tensor] = {}

    def keep(activation: torch.Tensor, hook=None) -> None:
        seen["source"] = activation

    def predicted(_target: torch.Tensor) -> torch.Tensor:
        if "source" not in seen:
            raise PipelineError(f"{target_hook} runs before {source_hook}: a transcoder reads an earlier hook")
        return predict(seen["source"].float())

    return [(source_hook, keep), (target_hook, splice_hook(predicted, replace_bos))]


def splice_hook(replace: Reconstruct, replace_bos: bool = False) -> Callable:
    """A TransformerLens forward hook that swaps a [batch, pos, d] activation for `replace` of it (computed in fp32),
    leaving position 0 (BOS) untouched unless `replace_bos`."""

    def splice(activation: torch.Tensor, hook=None) -> torch.Tensor:
        patched = replace(activation.float()).to(activation.dtype)
        if not replace_bos:
            patched[:, 0] = activation[:, 0]
        return patched

    return splice


def _log_probs(
    model, ids: torch.Tensor, mask: torch.Tensor, hook: str, replace: Reconstruct | None, replace_bos: bool = False,
    source_hook: str | None = None,
) -> torch.Tensor:  # fmt: skip
    """Next-token log-probabilities [n_real_positions, vocab] with `hook` replaced by `replace` (or not), of
    `source_hook`'s activation for a transcoder.

    The BOS position is replaced only if `replace_bos` (SAEs are never trained on it).
    """
    if replace is None:
        hooks = []
    elif source_hook is None:
        hooks = [(hook, splice_hook(replace, replace_bos))]
    else:
        hooks = transcoder_hooks(source_hook, hook, replace, replace_bos)
    with torch.inference_mode():
        logits = model.run_with_hooks(ids, attention_mask=mask, fwd_hooks=hooks, return_type="logits")
    return logits[mask.bool()].float().log_softmax(-1)
