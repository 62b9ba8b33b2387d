"""Training one or several SAEs on one shared, shuffled stream of activations.

Every SAE k consumes the epoch's token order in consecutive batches of its own size (batch_size * seq_len):
its step j of an epoch uses order[j * B_k : (j + 1) * B_k]. The stream hands out blocks of lcm(B_k) tokens, so
each block is read once and split into whole batches for every SAE, and a config trained alone sees exactly the
batches it sees when trained with the others.

Data-parallel (several processes, `data_parallel=True`): every rank reads the same stream and trains on its own
contiguous 1/W of each batch; the gradients, the loss and its terms are averaged over ranks with one all-reduce
before the optimiser step, so every rank applies the same update to the same parameters. The training
statistics a batch updates (tokens since a latent fired, the batch-selected threshold) are the whole batch's.
BatchTopK and Matryoshka still select their k * batch latents within each rank's share.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.artifacts import sae_name
from pipeline.core import distributed
from pipeline.core.device import StepTimer, amp_dtype, autocast, fused_adam, grad_scaler
from pipeline.core.errors import PipelineError
from pipeline.core.progress import progress_bars
from pipeline.core.seeds import generator
from pipeline.params import SAEConfig, TrainConfig, resolved
from pipeline.probe.guide import GuideProbe
from pipeline.saes import build_sae
from pipeline.saes.base import SparseAutoencoder
from pipeline.train.checkpoints import (
    check_resumable,
    checkpoint_files,
    checkpoint_state,
    read_checkpoint,
    restore,
    save_checkpoint,
)
from pipeline.train.loader import TrainingBlocks

MAX_BLOCK_FACTOR = 16  # the shared block may be at most this many times the largest batch
# Target L0: each step multiplies the sparsity coefficient by exp(L0_GAIN * clamp(log(L0 / target), -1, 1)): a
# proportional controller in log space, slow next to the optimiser so that L0 can follow. (A faster one, on
# (L0 - target) / target, drove relu into dead latents on the synthetic profile: L0 starts in the hundreds.)
L0_GAIN = 0.01
CURVE_COLUMNS = ("step", "tokens", "lr", "loss", "mse", "l1", "decorrelation", "l0")


@dataclass
class SAERun:
    """One SAE being trained: model, optimiser state, progress and measured statistics."""

    key: str
    cfg: SAEConfig  # resolved: every per-config setting filled in from the train section
    sae: SparseAutoencoder
    optimizer: torch.optim.Adam
    scaler: torch.amp.GradScaler
    batch_tokens: int
    steps_per_epoch: int
    timer: StepTimer  # device time inside this SAE's own steps
    step: int = 0
    skipped_steps: torch.Tensor | None = None  # fp16 steps the GradScaler skipped (kept on device: no sync)
    epoch_loss_sums: list[float] = field(default_factory=list)
    curve: list[dict[str, float]] = field(default_factory=list)
    shown: dict[str, float] = field(default_factory=dict)  # the last logged loss and L0, for the progress bar
    coefficient: torch.Tensor | None = None  # a target-L0 run's sparsity coefficient (on device), adapted then frozen
    guide: GuideProbe | None = None  # a guided run's frozen probe (pipeline/probe/guide.py)
    guide_column: int = -1  # the loader's column that holds its task's labels
    loss_of: Callable | None = None  # with train.torch_compile: the SAE's `training_loss`, compiled

    @property
    def train_seconds(self) -> float:
        return self.timer.seconds()

    @property
    def name(self) -> str:
        return sae_name(self.key, self.cfg)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.epochs

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps


class Trainer:
    """Fits every SAE in `configs` on `loader`'s stream, with checkpoints every `checkpoint_every` blocks."""

    def __init__(
        self,
        configs: dict[str, SAEConfig],
        loader: TrainingBlocks,
        train: TrainConfig,
        checkpoint_dir: Path,
        meta: dict[str, Any],
        data_parallel: bool = False,
        guides: dict[str, tuple[GuideProbe, int]] | None = None,
    ) -> None:
        """`guides`: for each guided config (coeff > 0), its probe and the loader column of its task's labels."""
        self.data_parallel = data_parallel and distributed.world_size() > 1
        self.ranks = distributed.world_size() if self.data_parallel else 1  # processes sharing each batch
        self.share_index = distributed.rank() if self.data_parallel else 0  # which 1/ranks of a batch is ours
        self.writes_checkpoints = not self.data_parallel or distributed.is_main()
        self.loader = loader
        self.train = train
        self.device = loader.device
        self.amp = amp_dtype(train.amp, self.device)
        self.checkpoint_dir = checkpoint_dir
        self.meta = meta
        self.scale = 1.0
        self.target_scale: float | None = None  # a transcoder group's: its targets' own scale
        self.d_in = loader.widths[0]  # a transcoder group's blocks are [input | target]
        self.n_activations = sum(loader.widths)  # then the loader's columns (token labels), if any
        self.runs = [self._new_run(key, resolved(cfg, train)) for key, cfg in configs.items()]
        for run in self.runs:
            run.guide, run.guide_column = (guides or {}).get(run.key, (None, -1))
        self.block_tokens = _shared_block(self.runs)

    def estimate_scale(self) -> float:
        """The constant that makes E||scale * x||^2 = d_in on a fixed sample of the training split (and, for a
        transcoder group, the same for its targets, `target_scale`)."""
        sample = self.loader.sample(self.train.scale_sample_tokens)[:, : self.n_activations]
        scales = [_unit_scale(part) for part in sample.split(self.loader.widths, dim=1)]
        if self.data_parallel:  # rank 0's figures, so that no rounding difference can make the ranks diverge
            scales = distributed.broadcast(scales)
        self.scale = scales[0]
        self.target_scale = scales[1] if len(scales) > 1 else None
        inputs = sample[:, : self.d_in] * self.scale
        for run in self.runs:  # a fresh run toward a target L0 starts near it, where its architecture can
            if run.cfg.target_l0 is not None and run.step == 0:
                run.sae.start_near_l0(inputs, run.cfg.target_l0)
        return self.scale

    def resume(self) -> list[str]:
        """Load each run's latest checkpoint, if any; returns the names of the runs resumed.

        Data-parallel, rank 0 reads the checkpoints it wrote and sends them to the other ranks, which may be on
        machines that do not see its disk.
        """
        states = {}
        if self.writes_checkpoints:
            found = {run.name: read_checkpoint(self.checkpoint_dir, run.name) for run in self.runs}
            states = {name: state for name, state in found.items() if state is not None}
        if self.data_parallel:
            states = distributed.broadcast(states)
        for run in self.runs:
            if run.name in states:
                self.load_state(run, states[run.name])
        return [run.name for run in self.runs if run.name in states]

    def fit(self) -> None:
        """Train every run to its last step. A loss that became NaN/inf is an error, and such weights are not saved."""
        if not self.all_done:
            tasks = {run.name: run.total_steps * run.batch_tokens for run in self.runs}
            with progress_bars(tasks) as bars:
                for run in self.runs:
                    bars[run.name].advance(run.step * run.batch_tokens)
                for epoch, block_index, block in self._remaining_blocks():
                    self._scaled(block[:, : self.n_activations])  # once per block, not once per batch
                    for run in self.runs:
                        self._train_on_block(run, epoch, block_index, block, bars[run.name])
                    if (block_index + 1) % self.train.checkpoint_every == 0:
                        self.save_checkpoints()
                    if self.all_done:
                        break
        for run in self.runs:
            self._check_finite(run)

    def _scaled(self, block: torch.Tensor) -> None:
        if self.target_scale is None:
            block.mul_(self.scale)
        else:
            block[:, : self.d_in].mul_(self.scale)
            block[:, self.d_in :].mul_(self.target_scale)

    def _remaining_blocks(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(epoch, block index, block) of the shared stream, from the earliest point an unfinished run needs."""
        first_epoch, first_block = min(
            (r.step // r.steps_per_epoch, r.step % r.steps_per_epoch * r.batch_tokens // self.block_tokens)
            for r in self.runs
            if not r.done
        )
        for epoch in range(first_epoch, max(r.cfg.epochs for r in self.runs)):
            start = first_block if epoch == first_epoch else 0
            blocks = self.loader.epoch(epoch, self.block_tokens, start, reuse_memory=True)  # each trained on in turn
            for block_index, block in enumerate(blocks, start):
                yield epoch, block_index, block

    @property
    def all_done(self) -> bool:
        return all(run.done for run in self.runs)

    def _train_on_block(self, run: SAERun, epoch: int, block_index: int, block: torch.Tensor, bar) -> None:
        """The batches of `block` that belong to `run` and that it has not trained on yet."""
        per_block = self.block_tokens // run.batch_tokens
        started = time.perf_counter()
        run.timer.start()
        n_trained = 0
        for j in range(len(block) // run.batch_tokens):
            step = epoch * run.steps_per_epoch + block_index * per_block + j
            if step != run.step or run.done:
                continue  # already trained before a resume, or this run has finished its epochs
            share = run.batch_tokens // self.ranks
            start = j * run.batch_tokens + self.share_index * share
            self._step(run, block[start : start + share])
            n_trained += 1
        if n_trained:
            run.timer.stop()
            # The host's time: on a GPU the host runs ahead by a few steps, so on average it is the device's, and
            # the bar never makes the host wait for the device.
            bar.advance(n_trained * run.batch_tokens, seconds=time.perf_counter() - started, **run.shown)

    def _step(self, run: SAERun, rows: torch.Tensor) -> None:
        batch = rows[:, : self.n_activations]
        x, target = (batch, None) if self.target_scale is None else (batch[:, : self.d_in], batch[:, self.d_in :])
        guide = (
            None if run.guide is None else run.guide.loss(rows[:, self.n_activations + run.guide_column], self.scale)
        )
        lr = run.cfg.lr * lr_factor(run.step, run.total_steps, run.cfg.warmup_frac, run.cfg.decay_frac)
        adapting = run.coefficient is not None and run.step < round(run.cfg.target_l0_frac * run.total_steps)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        logging = (run.step + 1) % self.train.log_every == 0 or run.step + 1 == run.total_steps
        loss, terms, skipped = train_step(
            run.sae,
            run.optimizer,
            run.scaler,
            x,
            self.amp,
            run.cfg,
            logging,
            average_over_ranks=self.data_parallel,
            target=target,
            coefficient=run.coefficient,
            guide=guide,
            loss_of=run.loss_of,
        )
        if adapting:  # toward the target L0, on the device: the host never waits for this batch's L0
            error = torch.log(terms["l0"].clamp_min(1e-3) / run.cfg.target_l0).clamp(-1.0, 1.0)
            run.coefficient.mul_(torch.exp(L0_GAIN * error))
            run.sae.steer_l0(error)
        if skipped is not None:
            run.skipped_steps += skipped
        epoch = run.step // run.steps_per_epoch
        if epoch == len(run.epoch_loss_sums):
            run.epoch_loss_sums.append(0.0)
        run.epoch_loss_sums[epoch] += loss  # a device tensor: summed without a sync
        run.step += 1
        if logging:
            self._check_finite(run)
            values = {k: float(v) for k, v in {"loss": loss, **terms}.items()}  # the host waits here, once a log step
            run.shown = {k: v for k, v in values.items() if k in ("loss", "l0")}
            run.curve.append({"step": run.step, "tokens": run.step * run.batch_tokens, "lr": lr} | values)

    def checkpoint_path(self, run: SAERun) -> Path:
        """The run's latest checkpoint."""
        return checkpoint_files(self.checkpoint_dir, run.name)[0]

    def save_checkpoints(self) -> None:
        if not self.writes_checkpoints:
            return
        for run in self.runs:
            self._check_finite(run)  # never a checkpoint of diverged weights
            save_checkpoint(self.state(run), self.checkpoint_dir, run.name)

    def _check_finite(self, run: SAERun) -> None:
        """An error if a step applied a NaN or inf loss: then its epoch's loss sum is one (with fp16's GradScaler
        such a step is skipped, no harm done). Called where the host waits for the device anyway."""
        if not run.scaler.is_enabled() and not all(math.isfinite(float(total)) for total in run.epoch_loss_sums):
            last = run.curve[-1]["step"] if run.curve else 0
            raise PipelineError(
                f"sae.{run.key}: the training loss became NaN or inf between steps {last} and {run.step} and the "
                f"weights were updated with it; nothing from this run after step {last} is saved. Lower "
                f"sae.{run.key}.lr, or check the activations"
            )

    def state(self, run: SAERun) -> dict[str, Any]:
        """Everything needed to resume `run` or to use its SAE; loadable with weights_only=True."""
        state = checkpoint_state(run, self.train, self.scale, self.meta)
        return state if self.target_scale is None else state | {"target_scale": self.target_scale}

    def load_state(self, run: SAERun, state: dict[str, Any]) -> None:
        """Continue from `state`; refuses (naming every difference) a checkpoint trained with other settings."""
        check_resumable(state, run, self.train, self.meta, self.checkpoint_path(run))
        restore(run, state)
        if run.guide is not None:  # the probe the run began with, not a refit
            run.guide = GuideProbe.from_state(state["guide"], self.device)
        self.scale = state["scale"]
        self.target_scale = state.get("target_scale")

    def _new_run(self, key: str, cfg: SAEConfig) -> SAERun:
        batch_tokens = cfg.batch_size * self.train.seq_len
        if batch_tokens > self.loader.n_tokens:
            raise PipelineError(
                f"sae.{key}: a batch of {cfg.batch_size} x {self.train.seq_len} = {batch_tokens} tokens is larger "
                f"than the {self.loader.n_tokens} training tokens of the split"
            )
        if batch_tokens % self.ranks:
            raise PipelineError(
                f"sae.{key}: a batch of {batch_tokens} tokens does not split evenly over {self.ranks} processes; "
                "choose a batch_size or a process count that divides it"
            )
        d_in = self.d_in
        d_out = self.loader.widths[1] if cfg.target_hook else None
        seed = self.train.seed if cfg.init_seed is None else cfg.init_seed
        try:
            sae = build_sae(cfg, d_in, init_generator(seed, cfg.width(d_in)), d_out).to(self.device)
        except PipelineError as exc:  # a setting that does not fit this width, e.g. k above d_sae
            raise PipelineError(f"sae.{key}: {exc}") from None
        if cfg.target_l0 is not None and not sae.sets_l0_by_penalty:
            raise PipelineError(f"sae.{key}.target_l0: a {cfg.architecture} SAE's L0 is set by k, not by a sparsity "
                                "coefficient; target_l0 steers relu and jumprelu")  # fmt: skip
        return SAERun(
            key=key,
            cfg=cfg,
            sae=sae,
            optimizer=torch.optim.Adam(sae.parameters(), lr=cfg.lr, fused=fused_adam(self.device)),
            scaler=grad_scaler(self.device, self.amp),
            batch_tokens=batch_tokens,
            steps_per_epoch=self.loader.n_tokens // batch_tokens,
            timer=StepTimer(self.device),
            coefficient=None
            if cfg.target_l0 is None
            else torch.tensor(float(getattr(cfg, sae.penalty[1])), device=self.device),
            skipped_steps=torch.zeros((), dtype=torch.long, device=self.device),
            loss_of=compiled_loss(sae) if self.train.torch_compile else None,
        )


def compiled_loss(sae: SparseAutoencoder, backend: str = "inductor") -> Callable:
    """`sae.training_loss` compiled (`train.torch_compile`): forward and, through AOTAutograd, backward."""
    return torch.compile(sae.training_loss, backend=backend)


def train_step(
    sae: SparseAutoencoder,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    x: torch.Tensor,
    amp: torch.dtype | None,
    cfg: SAEConfig,
    logged: bool,
    average_over_ranks: bool = False,
    target: torch.Tensor | None = None,
    coefficient: torch.Tensor | None = None,
    guide: Callable[[torch.Tensor], torch.Tensor] | None = None,
    loss_of: Callable | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
    """One optimiser step; returns the loss, its terms (detached, on device) and 1 if the scaler skipped it (None
    without a GradScaler: nothing is skipped). `loss_of` computes the loss in place of `sae.training_loss` (its
    compiled form).

    `average_over_ranks`: `x` is this rank's equal share of the batch; the gradients, loss and terms become
    their means over ranks (one all-reduce), which for these per-token means are those of the whole batch, and
    the SAE's batch statistics are the whole batch's.
    """
    with autocast(x.device, amp):
        loss, terms = (loss_of or sae.training_loss)(x, cfg, logged, average_over_ranks, target=target,
                                                      coefficient=coefficient, guide=guide)  # fmt: skip
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    loss, terms = loss.detach(), {k: v.detach() for k, v in terms.items()}
    if average_over_ranks:  # a non-finite gradient on any rank makes the mean non-finite: every rank skips alike
        gradients = [p.grad for p in sae.parameters() if p.grad is not None]
        distributed.average_([*gradients, loss, *terms.values()])
    skipped = None
    if scaler.is_enabled():
        scaler.unscale_(optimizer)
        grads = [p.grad.sum() for p in sae.parameters() if p.grad is not None]
        skipped = (~torch.isfinite(torch.stack(grads).sum())).long()  # what the scaler skips on, without a sync
    scaler.step(optimizer)
    scaler.update()
    sae.after_step()
    return loss, terms, skipped


def _unit_scale(x: torch.Tensor) -> float:
    """The constant c with E||c * x||^2 = width."""
    return math.sqrt(x.shape[1] / x.pow(2).sum(dim=1).mean().item())


def init_generator(seed: int, d_sae: int) -> torch.Generator:
    """The generator of an SAE's initial weights, mixed with its width.

    With one seed for every width, a narrower SAE's initial decoder would be the first rows of a wider one's, and
    feature stability across widths would measure that shared start rather than what training found.
    """
    return generator(seed, d_sae)


def lr_factor(step: int, total_steps: int, warmup_frac: float, decay_frac: float) -> float:
    """Linear warmup over the first `warmup_frac` of steps; linear decay to zero over the last `decay_frac`."""
    warmup = min(1.0, (step + 1) / max(1, round(warmup_frac * total_steps)))
    decay = min(1.0, (total_steps - step) / max(1, round(decay_frac * total_steps))) if decay_frac else 1.0
    return warmup * decay


def _shared_block(runs: list[SAERun]) -> int:
    block = math.lcm(*(r.batch_tokens for r in runs))
    largest = max(r.batch_tokens for r in runs)
    if block > MAX_BLOCK_FACTOR * largest:
        sizes = ", ".join(f"{r.key}: {r.batch_tokens}" for r in runs)
        raise PipelineError(
            f"batch sizes ({sizes} tokens) share no small common multiple ({block}); "
            "train these configs one at a time (--config KEY)"
        )
    return block
