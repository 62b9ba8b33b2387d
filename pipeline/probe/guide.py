"""Probe-guided training: a frozen linear probe of a label task, read on the SAE's reconstruction during training.

Before training, a multinomial logistic regression (scikit-learn, L2 with C = 1, features standardized) is fit
on the training split's stored activations of the task's labelled tokens: at most `max_per_class` tokens of each
class, drawn with the seed. It is folded into one linear map of raw activations, logits = W x + b, and frozen.
Training then adds, to the config's loss,

    coeff * (1/B) * sum over the batch's labelled tokens t of CE(W x_hat_t / scale + b, y_t)

(B: the batch's tokens, labelled or not; x_hat is in the trainer's scaled space, hence / scale): the mean over
the batch of the probe's cross-entropy on the reconstruction, unlabelled tokens counting zero. Dividing by B, not
by the labelled tokens, makes the data-parallel mean over equal shares the whole batch's. With coeff 0 the term is
not computed at all, so the run is the unguided one bit for bit. The probe is part of the checkpoint, so that a
resumed run reads the reconstructions with the same probe.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.errors import PipelineError
from pipeline.train.loader import ActivationLoader

MAX_ITER = 1000


@dataclass
class GuideProbe:
    """A frozen linear probe of raw activations: logits = x @ weight.T + bias, one per class of `task`."""

    task: str
    classes: list[str]  # the task's classes (those without training tokens get no logit: `present`)
    present: list[int]  # indices into `classes` of the probe's logits, in order
    weight: torch.Tensor  # [len(present), d] float32
    bias: torch.Tensor  # [len(present)]

    def __post_init__(self) -> None:
        # class -> index of its logit (-1: a class the probe lacks; the extra last entry maps the label -1 to -1),
        # made once: the training step only indexes it
        self.logit_of = torch.full((len(self.classes) + 1,), -1, dtype=torch.long, device=self.weight.device)
        self.logit_of[torch.tensor(self.present, device=self.weight.device)] = torch.arange(
            len(self.present), device=self.weight.device)  # fmt: skip

    def state(self) -> dict:
        return {"task": self.task, "classes": self.classes, "present": self.present, "weight": self.weight.cpu(),
                "bias": self.bias.cpu()}  # fmt: skip

    @classmethod
    def from_state(cls, state: dict, device: torch.device) -> GuideProbe:
        return cls(state["task"], list(state["classes"]), list(state["present"]), state["weight"].to(device),
                   state["bias"].to(device))  # fmt: skip

    def loss(self, labels: torch.Tensor, scale: float) -> Callable[[torch.Tensor], torch.Tensor]:
        """The guide's term for one batch: a function of its reconstruction (scaled space), given its labels (the
        task's class per token, -1 for none)."""
        targets = self.logit_of[labels.long()]

        def term(x_hat: torch.Tensor) -> torch.Tensor:
            logits = torch.addmm(self.bias, x_hat.float() / scale, self.weight.T)
            return F.cross_entropy(logits, targets, ignore_index=-1, reduction="sum") / len(targets)

        return term


def fit_guide_probe(
    loader: ActivationLoader, labels: np.ndarray, task: str, classes: list[str], max_per_class: int, seed: int
) -> GuideProbe:
    """Fit the probe of `task` on the loader's split: `labels`, the task's class of every token (-1: none)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    present = [c for c in range(len(classes)) if (labels == c).any()]
    if len(present) < 2:
        raise PipelineError(
            f"label task {task!r} has {'no' if not present else 'one class of'} labelled tokens in split "
            f"{loader.split!r}: nothing for a guide to tell apart"
        )
    chosen = np.sort(np.concatenate([rng.choice(where, min(len(where), max_per_class), replace=False)
                                     for where in (np.flatnonzero(labels == c) for c in present)]))  # fmt: skip
    x = loader.rows(torch.from_numpy(chosen))[:, : sum(loader.widths)].cpu().double().numpy()
    scaler = StandardScaler().fit(x)
    probe = LogisticRegression(C=1.0, max_iter=MAX_ITER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(scaler.transform(x), labels[chosen])
    weight = probe.coef_ / scaler.scale_  # standardization folded in: one map of raw activations
    bias = probe.intercept_ - weight @ scaler.mean_
    if len(present) == 2:  # scikit-learn's binary model is one logit: as two, its softmax is the same sigmoid
        weight, bias = np.stack([-weight[0] / 2, weight[0] / 2]), np.array([-bias[0] / 2, bias[0] / 2])
    device = loader.device
    return GuideProbe(task, classes, present, torch.tensor(weight, dtype=torch.float32, device=device),
                      torch.tensor(bias, dtype=torch.float32, device=device))  # fmt: skip
