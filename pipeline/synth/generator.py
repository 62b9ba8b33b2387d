"""Synthetic activations with known features, after the SynthSAEBench recipe (Chanin & Garriga-Alonso 2026).

Written from the recipe's description in SAELens's docs (docs/synth_sae_bench.md, docs/synthetic_data.md); where
the description leaves a detail open, this module's choice is stated here:

- Firing probabilities: Zipfian, p_i ∝ (i + 1)^-exponent, rescaled linearly so that feature 0 fires with `firing_max`
  and the last with `firing_min`.
- Correlations: a Gaussian copula with a low-rank factor. Feature i fires when z_i < Φ^-1(q_i), where
  z_i = u_i · g + sqrt(1 - |u_i|²) e_i with g ~ N(0, I_rank), e ~ N(0, I): each z_i is standard normal, so the
  marginal rate is q_i, and features i, j correlate through u_i · u_j. U's entries are N(0, correlation_scale²).
- Hierarchy: `roots` trees of branching `branching`, `depth` levels below the roots, on the most frequent
  features in breadth-first order (the roots are features 0..roots-1, their children the next roots × branching,
  each parent's children together), as SynthSAEBench builds it. A child fires only when its parent does, siblings
  are mutually exclusive (when several would fire, one chosen uniformly at random does), and a child's magnitude
  is multiplied by its parent's magnitude over the parent's mean magnitude. Base rates are compensated as
  SynthSAEBench compensates them: q_i = p_i / p_parent × (1 + Σ_{siblings j ≠ i} p_j / p_parent), capped at 1,
  with p the uncompensated rates. That is an approximation that leaves hierarchical features below p_i (for the
  16k recipe the mean true L0 is 34.5 where Σ p_i = 59.1; SynthSAEBench-16k's published true L0 is about 34);
  `expected_rates` holds every feature's resulting rate, computed exactly with siblings independent.
- Magnitudes: |N(mean_i, std_i)| when firing; mean_i linear from `magnitude_start` (feature 0) to `magnitude_end`;
  std_i = |N(std_mean, std_std)|, drawn once per feature.
- Directions: random unit vectors, then `orthogonalize_steps` Adam steps at `orthogonalize_lr` on their mean
  squared cosine, renormalised after each; a random bias vector of norm `bias_norm` is added to every sample.

Every random draw comes from generators seeded by (seed, purpose), so one seed gives the same model and samples.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.core.seeds import generator
from pipeline.params import SynthConfig
from pipeline.saes.base import decorrelation

TRUTH_ARRAYS = ("directions", "bias", "base_rates", "expected_rates", "parents", "depths", "magnitude_mean",
                "magnitude_std", "correlation_factor")  # fmt: skip
# Seeds the samples of each use apart: a store's train and test splits, and evaluation's fresh samples.
PURPOSES = {"train": 0, "test": 1, "evaluation": 2}
SAMPLE_CHUNK = 2048  # samples generated at once: [chunk, n_features] floats; larger chunks measured slower on CPU


@dataclass
class SyntheticModel:
    """The ground truth: feature directions and the distribution of their activations."""

    directions: torch.Tensor  # [n_features, d_model], unit rows
    bias: torch.Tensor  # [d_model]
    base_rates: torch.Tensor  # [n_features]: q_i, before hierarchy
    expected_rates: torch.Tensor  # [n_features]: the rate each feature really fires at (siblings independent)
    parents: torch.Tensor  # [n_features] long, -1 for none
    depths: torch.Tensor  # [n_features] long, -1 outside the hierarchy, 0 for roots
    magnitude_mean: torch.Tensor
    magnitude_std: torch.Tensor
    correlation_factor: torch.Tensor  # [n_features, rank]

    def __post_init__(self) -> None:
        self.levels = hierarchy_levels(self.parents, self.depths)  # roots first; empty without a hierarchy
        self.level_position = torch.zeros_like(self.parents)  # each node's index within its level
        for level in self.levels:
            self.level_position[level] = torch.arange(len(level), device=level.device)

    @property
    def n_features(self) -> int:
        return self.directions.shape[0]

    def arrays(self) -> dict[str, np.ndarray]:
        """Every tensor as a numpy array (what the store keeps beside the activations)."""
        return {name: getattr(self, name).cpu().numpy() for name in TRUTH_ARRAYS}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], device: torch.device) -> SyntheticModel:
        return cls(**{name: torch.from_numpy(np.asarray(arrays[name])).to(device) for name in TRUTH_ARRAYS})

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n samples: activations x [n, d_model] and true feature activations a [n, n_features]."""
        device = self.directions.device
        u = self.correlation_factor
        g = torch.randn(n, u.shape[1], generator=generator, device=device)
        noise = torch.randn(n, self.n_features, generator=generator, device=device)
        z = torch.addmm(noise * (1 - u.pow(2).sum(dim=1)).clamp_min(0).sqrt(), g, u.T)
        fires = z < torch.special.ndtri(self.base_rates)
        del noise, z
        for level in self.levels[1:]:  # a child whose parent's own draw failed never fires: drop it before the work
            fires[:, level] &= fires[:, self.parents[level]]
        firing = torch.nonzero(fires.view(-1)).flatten()  # flat [n * F] ids
        del fires
        # Flat ids and torch.take: on CPU, indexing with two index tensors is several times slower.
        features = firing % self.n_features
        magnitudes = torch.randn(len(firing), generator=generator, device=device)  # only where firing
        a = torch.zeros(n, self.n_features, device=device)
        mean, std = self.magnitude_mean.take(features), self.magnitude_std.take(features)
        a.view(-1).index_copy_(0, firing, (mean + std * magnitudes).abs())
        depths = self.depths.take(features)
        for depth in range(1, len(self.levels)):
            self._apply_level(a, firing.masked_select(depths == depth), depth, generator)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the product below is all this uses
            warnings.filterwarnings("ignore", "Sparse CSR tensor support", UserWarning)
            mixed = a.to_sparse_csr() @ self.directions  # ~L0 of n_features nonzero: 5x a dense product on CPU
        return mixed + self.bias, a

    def _apply_level(self, a: torch.Tensor, entries: torch.Tensor, depth: int, generator: torch.Generator) -> None:
        """The firing children at `depth` (flat ids into `a`), in place: each fires only with its parent, one
        sibling at most (chosen uniformly among those firing), and its magnitude is scaled by the parent's over the
        parent's mean magnitude. Costs O(firing entries), not O(n * n_features)."""
        rows, children = entries // self.n_features, entries % self.n_features
        parents = self.parents.take(children)
        flat = a.view(-1)
        parent_value = flat.take(rows * self.n_features + parents)
        n_parents = len(self.levels[depth - 1])
        group = rows * n_parents + self.level_position.take(parents)  # one per (sample, parent)
        score = torch.rand(len(entries), generator=generator, device=a.device)
        best = torch.full((len(a) * n_parents,), -1.0, device=a.device).scatter_reduce_(0, group, score, "amax")
        keep = (score == best.take(group)) & (parent_value > 0)
        scaled = flat.take(entries) * keep * parent_value / self.magnitude_mean.take(parents)
        flat.index_copy_(0, entries, scaled)


def build(cfg: SynthConfig, device: torch.device) -> SyntheticModel:
    """The synthetic model `cfg` describes (deterministic in cfg.seed; built on the CPU, then moved)."""
    rng = np.random.default_rng(cfg.seed)
    n = cfg.n_features
    rank = np.arange(1, n + 1, dtype=np.float64) ** -cfg.zipf_exponent
    shares = (rank - rank[-1]) / (rank[0] - rank[-1]) if n > 1 else np.ones(1)
    rates = cfg.firing_min + (cfg.firing_max - cfg.firing_min) * shares
    parents, depths = _hierarchy(cfg)
    base, expected = _compensated_rates(rates, parents, depths)
    magnitude_mean = np.linspace(cfg.magnitude_start, cfg.magnitude_end, n)
    magnitude_std = np.abs(rng.normal(cfg.magnitude_std_mean, cfg.magnitude_std_std, n))
    correlation = rng.normal(0.0, cfg.correlation_scale, (n, cfg.correlation_rank))
    correlation /= np.maximum(1.0, np.linalg.norm(correlation, axis=1, keepdims=True) / 0.99)  # keep |u_i| < 1
    bias = rng.standard_normal(cfg.d_model)
    bias *= cfg.bias_norm / max(np.linalg.norm(bias), 1e-12)
    directions = _orthogonalized(torch.from_numpy(rng.standard_normal((n, cfg.d_model))).float(), cfg)
    arrays = {
        "directions": directions.numpy(), "bias": bias, "base_rates": base, "expected_rates": expected,
        "parents": parents, "depths": depths, "magnitude_mean": magnitude_mean, "magnitude_std": magnitude_std,
        "correlation_factor": correlation,
    }  # fmt: skip
    as_float = {
        k: v.astype(np.int64) if k in ("parents", "depths") else v.astype(np.float32) for k, v in arrays.items()
    }
    return SyntheticModel.from_arrays(as_float, device)


def hierarchy_size(cfg: SynthConfig) -> int:
    """Features in the hierarchy: roots * (1 + b + ... + b^depth)."""
    return cfg.hierarchy_roots * sum(cfg.hierarchy_branching**level for level in range(cfg.hierarchy_depth + 1))


def _hierarchy(cfg: SynthConfig) -> tuple[np.ndarray, np.ndarray]:
    parents = np.full(cfg.n_features, -1, dtype=np.int64)
    depths = np.full(cfg.n_features, -1, dtype=np.int64)
    nodes = np.arange(hierarchy_size(cfg))  # the most frequent features, breadth first
    level = nodes[: cfg.hierarchy_roots]
    depths[level] = 0
    start = len(level)
    for depth in range(1, cfg.hierarchy_depth + 1):
        children = nodes[start : start + len(level) * cfg.hierarchy_branching]
        parents[children] = np.repeat(level, cfg.hierarchy_branching)
        depths[children] = depth
        level, start = children, start + len(children)
    return parents, depths


def _compensated_rates(target: np.ndarray, parents: np.ndarray, depths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Base rates q (SynthSAEBench's compensation, see the module's docstring) and the rates they result in."""
    base, expected = target.copy(), target.copy()
    levels = [level.numpy() for level in hierarchy_levels(torch.from_numpy(parents), torch.from_numpy(depths))]
    for above, level in itertools.pairwise(levels):
        groups = level.reshape(len(above), -1)  # [n_parents, branching]
        p, parent_target = target[groups], target[above][:, None]
        q = np.minimum(1.0, p / parent_target * (1 + (p.sum(axis=1, keepdims=True) - p) / parent_target))
        base[groups] = q
        expected[groups] = expected[above][:, None] * q * _chosen_probability(q)
    return base, expected


def _chosen_probability(q: np.ndarray) -> np.ndarray:
    """P(sibling j is the one kept | j fires), siblings firing independently with rates q [groups, branching].

    The kept one is uniform among those firing: E[1 / (1 + K)] with K the number of other siblings firing.
    """
    result = np.zeros_like(q)
    for j in range(q.shape[1]):
        others = np.delete(q, j, axis=1)
        counts = np.zeros((q.shape[0], q.shape[1]))  # P(K = m), Poisson-binomial by dynamic programming
        counts[:, 0] = 1.0
        for column in others.T:
            counts[:, 1:] = counts[:, 1:] * (1 - column[:, None]) + counts[:, :-1] * column[:, None]
            counts[:, 0] *= 1 - column
        result[:, j] = (counts / np.arange(1, q.shape[1] + 1)).sum(axis=1)
    return result


def hierarchy_levels(parents: torch.Tensor, depths: torch.Tensor) -> list[torch.Tensor]:
    """Feature ids of each level of the hierarchy, roots first; each level's children are grouped by parent, in
    the order of the parents in the level above (so level d reshapes to [len(level d-1), branching])."""
    levels = [torch.nonzero(depths == 0).flatten()]
    position = torch.zeros_like(parents)
    for depth in range(1, int(depths.max().item()) + 1 if len(depths) else 0):
        position[levels[-1]] = torch.arange(len(levels[-1]), device=parents.device)
        children = torch.nonzero(depths == depth).flatten()
        levels.append(children[torch.argsort(position[parents[children]] * len(parents) + children)])
    return levels if len(levels[0]) else []


def _orthogonalized(directions: torch.Tensor, cfg: SynthConfig) -> torch.Tensor:
    directions = torch.nn.functional.normalize(directions, dim=1).requires_grad_(True)
    optimizer = torch.optim.Adam([directions], lr=cfg.orthogonalize_lr)
    for _ in range(cfg.orthogonalize_steps):
        optimizer.zero_grad()
        decorrelation(directions).backward()
        optimizer.step()
        with torch.no_grad():
            directions /= directions.norm(dim=1, keepdim=True)
    return directions.detach()


def sample_generator(seed: int, purpose: str, index: int, device: torch.device) -> torch.Generator:
    """The generator for one chunk of samples (a shard, or an evaluation chunk): distinct for every (seed,
    purpose, index)."""
    return generator(seed, PURPOSES[purpose], index, device=device)


def samples(model: SyntheticModel, n: int, chunks_from: torch.Generator) -> torch.Tensor:
    """n samples [n, d_model] in float32 on the model's device, generated SAMPLE_CHUNK at a time from one
    generator: one shard of a split (written to the store, or streamed to the trainer)."""
    chunks = [model.sample(min(SAMPLE_CHUNK, n - start), chunks_from)[0] for start in range(0, n, SAMPLE_CHUNK)]
    return torch.cat(chunks)


def mean_true_l0(model: SyntheticModel) -> float:
    """Expected number of features active per sample."""
    return float(model.expected_rates.sum().item())


def cosine_baseline(d_model: int) -> float:
    """E|cos| between two independent uniformly random directions in d_model dimensions."""
    return math.exp(math.lgamma(d_model / 2) - math.lgamma((d_model + 1) / 2)) / math.sqrt(math.pi)
