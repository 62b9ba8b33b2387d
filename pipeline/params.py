"""Typed parameters: the one place defaults live (docs/params.md describes every key).

`params.yaml` is read into these dataclasses; `-S section.key=value` overrides are applied on top, in the same
spirit as `dvc exp run -S`. Unknown keys, wrong types and values out of range are errors that name the key. This
module imports no torch, so that a typo answers at once.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from pipeline.core.errors import PipelineError
from pipeline.core.location import LOCAL_SCHEME, is_url
from pipeline.saes import ARCHITECTURES

DEFAULT_PARAMS_FILE = "params.yaml"


@dataclass
class ModelConfig:
    name: str = "openai-community/gpt2"  # hub id, or a local directory with an HF checkpoint and tokenizer
    revision: str | None = None  # hub revision; None means the default branch
    process_weights: bool = False  # TransformerLens compatibility mode (fold LayerNorm, centre weights)
    device: str = "auto"  # auto = cuda when present, else cpu
    dtype: str = "auto"  # compute dtype; auto = float16 on cuda, float32 on cpu
    attn_implementation: str = "sdpa"  # sdpa: fused wherever no hook looks inside attention; eager: the bridge's own


@dataclass
class DataConfig:
    dataset: str = "openai/gsm8k"  # hub id, or a local directory of .jsonl/.json/.parquet/.txt files
    config: str | None = "main"  # hub dataset configuration
    splits: list[str] = field(default_factory=lambda: ["train", "test"])
    max_docs: int | None = None  # per split; None = all
    max_tokens: int | None = None  # per split: the leading documents whose tokens fit; None = all
    template: str = "{question}\n{answer}"  # one row -> one document; {text} for a plain corpus
    bos: str = "auto"  # the token before every document: auto = the tokenizer's BOS, or its EOS where it has none
    test_fraction: float | None = None  # hold out this share of splits[0]'s documents as splits[1]
    split_seed: int = 0  # which documents test_fraction holds out


@dataclass
class ExtractConfig:
    hooks: list[str] = field(default_factory=lambda: ["blocks.6.hook_resid_pre", "blocks.6.hook_resid_post"])
    store: str = "data/activations"
    source: str = "gsm8k"  # gsm8k: the model's activations on the dataset; synthetic: the `synth` section's data
    dtype: str = "float16"  # stored activation dtype
    batch_tokens: int | None = None  # padded tokens per forward pass; None = 16384 on cuda, 2048 on cpu
    shard_tokens: int = 65536  # tokens per shard file: the unit of writing and of resuming
    chunk_tokens: int = 4096  # tokens per chunk inside a shard: the unit of reading
    nproc: int = 1  # local processes (torchrun); > 1 shards the work across them (docs/scaling.md)


# Loss and optimiser settings a config may set for itself; where it does not, the train section's value applies.
PER_CONFIG_SETTINGS = (
    "hook", "target_l0", "target_l0_frac", "l1_coeff", "decorrelation_coeff", "warmup_frac", "decay_frac", "k",
    "k_aux", "aux_coeff", "dead_tokens", "l0_coeff", "jumprelu_bandwidth", "jumprelu_initial_threshold",
    "matryoshka_prefixes", "relu_decoder_norm",
)  # fmt: skip
# Per-config settings newer than some saved configs (checkpoints, train details), with the value those were trained
# with before the setting existed.
SETTINGS_BEFORE = {"relu_decoder_norm": "unit"}


@dataclass
class GuideConfig:
    """Probe-guided training (pipeline/probe/guide.py): the reconstructions should keep what a linear probe of a
    label task reads in the activations."""

    task: str  # a label task of `pipeline label` (region, step, operation, role, number, number_source)
    coeff: float = 0.1  # weight of the probe's cross-entropy on the reconstruction; 0 trains as without a guide


OPERATORS = "+-*/"  # the calculator annotations' operators (pipeline/label), in their canonical order


@dataclass
class DocumentsConfig:
    """A reasoning task: the documents of a split whose solutions have this structure (their token labels'
    per-document counts, pipeline/label). Every criterion set must hold; unset ones do not count."""

    operations: list[str] | None = None  # every operation of the solution is one of these (["+", "-"])
    any_operation: list[str] | None = None  # the solution uses one of these at least (["*", "/"])
    min_steps: int | None = None  # reasoning steps (lines before `#### N`)
    max_steps: int | None = None

    def describe(self) -> str:
        """The task in words, e.g. `operations within {+, -}`."""
        parts = []
        if self.operations is not None:
            parts.append(f"operations within {{{', '.join(self.operations)}}}")
        if self.any_operation is not None:
            parts.append(f"some {' or '.join(self.any_operation)}")
        if self.max_steps is None and self.min_steps is not None:
            parts.append(f"{self.min_steps} steps or more")
        elif self.max_steps is not None:
            parts.append(f"{self.min_steps or 1}-{self.max_steps} steps")
        return ", ".join(parts) or "every document"


@dataclass
class SAEConfig:
    batch_size: int  # in sequences of train.seq_len tokens
    lr: float
    expansion: int | None = None  # latents = expansion * d_in; or...
    d_sae: int | None = None  # ...exactly this many latents (one of the two)
    epochs: int = 3
    architecture: str = "relu"  # a name in pipeline/saes: relu | topk | batchtopk | jumprelu | matryoshka
    init_seed: int | None = None  # seed of the initial weights (mixed with the width); None = train.seed
    target_hook: str | None = None  # a transcoder: predict this stored hook from `hook`; None = an ordinary SAE
    skip: bool = False  # a transcoder with a learned linear skip path W_skip x
    guide: GuideConfig | None = None  # probe-guided training; None = the loss without it
    documents: DocumentsConfig | None = None  # train on these documents of train.split only; None = all
    # None = the train section's value (see TrainConfig for their meaning).
    hook: str | None = None
    target_l0: float | None = None
    target_l0_frac: float | None = None
    l1_coeff: float | None = None
    decorrelation_coeff: float | None = None
    warmup_frac: float | None = None
    decay_frac: float | None = None
    k: int | None = None
    k_aux: int | None = None
    aux_coeff: float | None = None
    dead_tokens: int | None = None
    l0_coeff: float | None = None
    jumprelu_bandwidth: float | None = None
    jumprelu_initial_threshold: float | None = None
    matryoshka_prefixes: list[float] | None = None
    relu_decoder_norm: str | None = None

    def width(self, d_in: int) -> int:
        """The number of latents over `d_in` input dimensions."""
        return self.d_sae if self.d_sae is not None else self.expansion * d_in

    @property
    def width_label(self) -> str:
        """The width in artifact names: `8x` (an expansion) or `4096` (latents)."""
        return f"{self.expansion}x" if self.d_sae is None else str(self.d_sae)


@dataclass
class TrainConfig:
    hook: str = "blocks.6.hook_resid_post"
    split: str = "train"
    seq_len: int = 512  # tokens per "sequence" of batch_size: batch = batch_size * seq_len token activations
    target_l0: float | None = None  # relu, jumprelu: adapt the sparsity coefficient toward this L0; None = fixed
    target_l0_frac: float = 0.9  # share of each config's steps during which it adapts (then frozen)
    l1_coeff: float = 5e-3  # relu: L1 penalty on the latents
    decorrelation_coeff: float = 1.0  # every architecture: mean squared cosine between decoder rows
    warmup_frac: float = 0.05
    decay_frac: float = 0.0  # linear decay to zero over this final share of steps (the seed: none)
    k: int = 32  # topk: active latents per token; batchtopk, matryoshka: per token on average over a batch
    k_aux: int = 512  # topk family, AuxK loss: dead latents that reconstruct the residual
    aux_coeff: float = 0.03125  # topk family: weight of the AuxK loss (1/32, as Gao et al.)
    dead_tokens: int = 1_000_000  # topk family: a latent that has not fired for this many tokens is dead
    l0_coeff: float = 1e-3  # jumprelu: L0 penalty (per-element MSE scale, like l1_coeff)
    jumprelu_bandwidth: float = 0.05  # jumprelu: width of the straight-through estimators' kernel
    jumprelu_initial_threshold: float = 0.01
    matryoshka_prefixes: list[float] = field(default_factory=lambda: [0.0625, 0.125, 0.25, 0.5])  # shares of d_sae
    relu_decoder_norm: str = "free"  # relu: free = learned decoder norms weigh the L1; unit = rows renormalised
    amp: str = "auto"  # auto = fp16 on cuda, none on cpu; or none | fp16 | bf16
    torch_compile: bool = False  # torch.compile each SAE's loss, forward and backward (docs/training.md)
    seed: int = 0
    device: str = "auto"
    memory_budget_gb: float = 8.0  # the split on the device when it fits, else streamed from the store within it
    nproc: int = 1  # local processes (torchrun); > 1 trains on several, as `distribute` says
    distribute: str = "data"  # data: every rank a slice of every batch; configs: every rank its own configs
    exclude_bos: bool = True
    scale_sample_tokens: int = 65536  # tokens used to estimate the input scale factor
    checkpoint_every: int = 10  # shared blocks (lcm of the batch sizes, in tokens) between resumable checkpoints
    log_every: int = 20  # steps between logged curve points (each costs a device sync)
    out_dir: str = "artifacts"


@dataclass
class EvaluateConfig:
    split: str = "test"
    n_docs: int | None = None  # documents used for splice scores; None = all
    batch_tokens: int = 4096
    dense_threshold: float = 0.1  # a latent active on more than this share of tokens is "dense"


@dataclass
class AnalyzeConfig:
    """What `pipeline analyze` keeps per latent for the feature browser (pipeline/analyze)."""

    split: str = "test"
    top_n: int = 10  # top-activating contexts
    quantiles: int = 5  # equal-width activation intervals of [0, max] to sample examples from
    per_quantile: int = 2  # examples drawn from each interval
    window: int = 8  # context tokens shown either side
    histogram_bins: int = 24
    logit_tokens: int = 8  # top and bottom vocabulary entries of the direct logit effect
    batch_tokens: int = 4096


@dataclass
class ProbeConfig:
    """Token labels from the solutions' structure (`pipeline label`) and probes on them (`pipeline probe`)."""

    labels: str = "data/labels"  # where `pipeline label` keeps the store's token labels (a local directory)
    split: str | None = None  # the split probed (null: evaluate.split): probes fit on half, scored on the other
    tasks: list[str] | None = None  # label tasks to probe; null = every task the labels hold
    min_positives: int = 20  # a class is probed when each half holds at least this many of its tokens
    max_per_class: int = 2000  # per half: at most this many tokens of the class, and as many of the rest
    k: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20, 50])  # latents per sparse probe, as SAEBench
    seed: int = 0  # which documents fall in which half, and which tokens are sampled
    across: list[DocumentsConfig] = field(default_factory=list)  # two reasoning tasks to compare latents across


@dataclass
class SynthConfig:
    """Synthetic data with known features (pipeline/synth); defaults: the SynthSAEBench-16k recipe."""

    n_features: int = 16384
    d_model: int = 768
    n_train: int = 10_000_000  # samples in the train split (a store of n * d_model * 2 bytes in float16)
    stream: bool = False  # generate the train split while training instead of storing it (pipeline/synth/stream.py)
    n_test: int = 200_000
    firing_max: float = 0.4  # Zipfian firing probabilities, from the most frequent feature...
    firing_min: float = 5e-4  # ...to the rarest
    zipf_exponent: float = 0.5
    hierarchy_roots: int = 128
    hierarchy_branching: int = 4
    hierarchy_depth: int = 3  # levels below the roots
    correlation_rank: int = 25
    correlation_scale: float = 0.1
    magnitude_start: float = 5.0  # mean magnitude of the most frequent feature, linear to...
    magnitude_end: float = 4.0  # ...the rarest one's
    magnitude_std_mean: float = 0.5  # per-feature magnitude std ~ |N(mean, std)|
    magnitude_std_std: float = 0.5
    bias_norm: float = 0.5
    orthogonalize_steps: int = 100
    orthogonalize_lr: float = 3e-4
    eval_samples: int = 100_000  # fresh samples for the ground-truth precision/recall at evaluate
    seed: int = 42
    device: str = "auto"  # where samples are generated (cuda draws differ from cpu draws: part of the identity)


@dataclass
class Params:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    sae: dict[str, SAEConfig] = field(
        default_factory=lambda: {
            "a": SAEConfig(expansion=4, batch_size=64, lr=3e-4),
            "b": SAEConfig(expansion=6, batch_size=48, lr=2e-4),
            "c": SAEConfig(expansion=8, batch_size=32, lr=1e-4),
        }
    )
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    analyze: AnalyzeConfig = field(default_factory=AnalyzeConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    # Not a parameter: the command line that ran (set by the CLI), recorded so that outputs say how to reproduce them.
    command: str = field(default="", repr=False)

    def sae_configs(self, which: str) -> dict[str, SAEConfig]:
        """The SAE configs named by `which` ("all" or one key of the `sae` section)."""
        if which == "all":
            return dict(self.sae)
        if which not in self.sae:
            raise PipelineError(f"unknown SAE config {which!r}; params define: {', '.join(self.sae)}")
        return {which: self.sae[which]}

    def hook_of(self, key: str) -> str:
        """The stored hook config `key` reads: its own `hook`, else `train.hook`."""
        return self.sae[key].hook or self.train.hook

    def by_hook(self, keys) -> dict[str, list[str]]:
        """`keys` grouped by the hook each reads, hooks in order of first appearance."""
        groups: dict[str, list[str]] = {}
        for key in keys:
            groups.setdefault(self.hook_of(key), []).append(key)
        return groups

    def by_reads(self, keys) -> dict[tuple[str, str | None], list[str]]:
        """`keys` grouped by what each reads: (hook, a transcoder's target hook or None), in order of appearance."""
        groups: dict[tuple[str, str | None], list[str]] = {}
        for key in keys:
            groups.setdefault((self.hook_of(key), self.sae[key].target_hook), []).append(key)
        return groups


def resolved(cfg: SAEConfig, train: TrainConfig) -> SAEConfig:
    """`cfg` with every unset per-config setting taken from the train section: the settings that really apply."""
    return dataclasses.replace(
        cfg, **{name: getattr(train, name) for name in PER_CONFIG_SETTINGS if getattr(cfg, name) is None}
    )


def load_params(path: str | Path = DEFAULT_PARAMS_FILE, overrides: list[str] | None = None) -> Params:
    """Read a params file, apply `key.path=value` overrides, validate every value's type."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise PipelineError(f"{path} must hold a mapping of sections")
    for item in overrides or []:
        _apply_override(raw, item)
    params = _build(Params, raw, "")
    _validate(params)
    return params


def configured_sae_keys(path: str | Path = DEFAULT_PARAMS_FILE) -> list[str]:
    """The `sae` keys a params file defines (the defaults' when it cannot be read): for help texts."""
    try:
        keys = list(yaml.safe_load(Path(path).read_text())["sae"])
    except Exception:  # help must never fail: a missing or broken file is reported when a stage runs
        keys = list(Params().sae)
    return [str(k) for k in keys]


def params_to_dict(params: Any) -> Any:
    """Plain dict/list form of a config (for metadata and checkpoints)."""
    return dataclasses.asdict(params) if dataclasses.is_dataclass(params) else params


@dataclass(frozen=True)
class _Override:
    """A `-S` value: its text as typed, and that text read as YAML. A string parameter takes the text as typed
    where YAML would read something else (`-S 'data.template={text}'` is the template `{text}`, not the mapping
    {text: null}); a quoted string, null, and every other parameter take the YAML value."""

    text: str
    value: Any


def _apply_override(raw: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise PipelineError(f"override {item!r} must look like section.key=value")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        if isinstance(node.get(part), _Override):  # an earlier -S set this whole section
            node[part] = node[part].value
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise PipelineError(f"override {key!r}: {part!r} is not a section")
    node[parts[-1]] = _Override(text, value)


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise PipelineError(f"{where or 'params'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} - {"command"}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise PipelineError(
            f"unknown parameter {_join(where, unknown[0])!r}; valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name in names & set(raw):
        kwargs[name] = _coerce(hints[name], raw[name], _join(where, name))
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field (e.g. sae.x.lr) is missing
        raise PipelineError(f"{where or 'params'}: {exc}") from exc


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if isinstance(value, _Override):
        takes_text = str in (args if origin in (typing.Union, types.UnionType) else (hint,))
        as_text = takes_text and not isinstance(value.value, str | None)  # a quoted string is YAML's to unquote
        return _coerce(hint, value.text if as_text else value.value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise PipelineError(f"{key} must be a mapping")
        return {str(k): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise PipelineError(f"{key} must be a list, got {value!r}")
        return [_coerce(args[0], v, key) for v in value]
    if hint is float and not isinstance(value, bool) and isinstance(value, int | float | str):
        try:  # YAML 1.1 reads "5e-5" as a string
            number = float(value)
        except ValueError:
            number = None
        if number is not None:
            if not math.isfinite(number):
                raise PipelineError(f"{key} must be a finite number, got {value!r}")
            return number
    if hint is str and isinstance(value, dict | list):  # YAML read `{text}` or `[a]` as a mapping or a list
        raise PipelineError(
            f"{key} must be a string, got {value!r}: YAML reads an unquoted {{...}} or [...] as a mapping or a list; "
            f'quote the value, e.g. {key.rsplit(".", 1)[-1]}: "{{text}}" in a params file, or '
            f"-S '{key}=\"{{text}}\"' with dvc exp run"
        )
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise PipelineError(f"{key} must be {hint.__name__}, got {value!r}")
    return value


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _validate(params: Params) -> None:
    """Every value in its allowed range; an error names the key, the value and the range."""
    m, d, x, t, e, s = params.model, params.data, params.extract, params.train, params.evaluate, params.synth
    positive = "a positive integer"
    checks = [
        (m.dtype in ("auto", "float32", "float16", "bfloat16"), "model.dtype", m.dtype,
         "auto, float32, float16 or bfloat16"),
        (m.attn_implementation in ("sdpa", "eager"), "model.attn_implementation", m.attn_implementation,
         "sdpa or eager"),
        (DEVICE_PATTERN.match(m.device), "model.device", m.device, "auto, cpu, cuda, cuda:N or mps"),
        (DEVICE_PATTERN.match(t.device), "train.device", t.device, "auto, cpu, cuda, cuda:N or mps"),
        (x.dtype in ("float16", "float32"), "extract.dtype", x.dtype, "float16 or float32"),
        (bool(x.hooks), "extract.hooks", x.hooks, "at least one hook name"),
        (not _is_cwd_or_above(x.store), "extract.store", x.store,
         "a directory of its own, not the working directory or one above it"),
        (not is_url(x.store) or urlsplit(x.store).path.strip("/"), "extract.store", x.store,
         "a URL with a prefix below the bucket, such as s3://bucket/activations"),
        (bool(d.splits), "data.splits", d.splits, "at least one split"),
        (d.max_docs is None or d.max_docs > 0, "data.max_docs", d.max_docs, "null or a positive integer"),
        (d.bos in ("auto", "bos", "eos"), "data.bos", d.bos, "auto, bos or eos"),
        (d.max_tokens is None or d.max_tokens > 0, "data.max_tokens", d.max_tokens, "null or a positive integer"),
        (d.test_fraction is None or 0 < d.test_fraction < 1, "data.test_fraction", d.test_fraction,
         "null or a number between 0 and 1"),
        (d.test_fraction is None or len(d.splits) == 2, "data.splits", d.splits,
         "two names with data.test_fraction: the split to read, then the one held out from it"),
        (x.batch_tokens is None or x.batch_tokens > 0, "extract.batch_tokens", x.batch_tokens,
         "null or a positive integer"),
        (x.chunk_tokens > 0, "extract.chunk_tokens", x.chunk_tokens, positive),
        (x.shard_tokens > 0 and x.shard_tokens % x.chunk_tokens == 0, "extract.shard_tokens", x.shard_tokens,
         "a positive multiple of extract.chunk_tokens"),
        (t.amp in ("auto", "none", "fp16", "bf16"), "train.amp", t.amp, "auto, none, fp16 or bf16"),
        (t.seq_len > 0, "train.seq_len", t.seq_len, positive),
        (x.nproc > 0, "extract.nproc", x.nproc, positive),
        (t.nproc > 0, "train.nproc", t.nproc, positive),
        (t.distribute in ("data", "configs"), "train.distribute", t.distribute, "data or configs"),
        (not (t.torch_compile and t.nproc > 1 and t.distribute == "data"), "train.torch_compile", t.torch_compile,
         "false with data-parallel training (train.nproc > 1, distribute data): untested there"),
        (t.memory_budget_gb >= 0, "train.memory_budget_gb", t.memory_budget_gb, ">= 0"),
        (t.scale_sample_tokens > 0, "train.scale_sample_tokens", t.scale_sample_tokens, positive),
        (t.checkpoint_every > 0, "train.checkpoint_every", t.checkpoint_every, positive),
        (t.log_every > 0, "train.log_every", t.log_every, positive),
        (e.batch_tokens > 0, "evaluate.batch_tokens", e.batch_tokens, positive),
        (e.n_docs is None or e.n_docs > 0, "evaluate.n_docs", e.n_docs, "null or a positive integer"),
        (0 < e.dense_threshold <= 1, "evaluate.dense_threshold", e.dense_threshold, "0 < value <= 1"),
        *(
            (getattr(params.analyze, name) > 0, f"analyze.{name}", getattr(params.analyze, name), positive)
            for name in ("top_n", "quantiles", "per_quantile", "histogram_bins", "logit_tokens", "batch_tokens")
        ),
        (params.analyze.window >= 0, "analyze.window", params.analyze.window, ">= 0"),
        (params.probe.min_positives > 0, "probe.min_positives", params.probe.min_positives, positive),
        (params.probe.max_per_class >= params.probe.min_positives, "probe.max_per_class",
         params.probe.max_per_class, ">= probe.min_positives"),
        (bool(params.probe.k) and all(k > 0 for k in params.probe.k), "probe.k", params.probe.k,
         "a list of positive integers"),
        (not is_url(params.probe.labels), "probe.labels", params.probe.labels, "a local directory"),
        (bool(params.sae), "sae", params.sae, "at least one config"),
        (x.source in ("gsm8k", "synthetic"), "extract.source", x.source, "gsm8k or synthetic"),
        (DEVICE_PATTERN.match(s.device), "synth.device", s.device, "auto, cpu, cuda, cuda:N or mps"),
        (s.d_model > 0, "synth.d_model", s.d_model, positive),
        (s.n_train > 0 and s.n_test > 0 and s.eval_samples > 0, "synth.n_train, n_test, eval_samples",
         (s.n_train, s.n_test, s.eval_samples), "positive integers"),
        (0 < s.firing_min <= s.firing_max <= 1, "synth.firing_min, firing_max", (s.firing_min, s.firing_max),
         "0 < firing_min <= firing_max <= 1"),
        (s.hierarchy_roots >= 0 and s.hierarchy_branching > 0 and s.hierarchy_depth >= 0
         and s.hierarchy_roots * sum(s.hierarchy_branching**i for i in range(s.hierarchy_depth + 1)) <= s.n_features,
         "synth.hierarchy_*", (s.hierarchy_roots, s.hierarchy_branching, s.hierarchy_depth),
         "a hierarchy of at most synth.n_features nodes"),
        (s.correlation_rank > 0 and s.correlation_scale >= 0, "synth.correlation_*",
         (s.correlation_rank, s.correlation_scale), "a positive rank and a scale >= 0"),
    ]  # fmt: skip
    for key, cfg in params.sae.items():
        checks += [
            ((cfg.expansion is None) != (cfg.d_sae is None), f"sae.{key}.expansion, d_sae",
             (cfg.expansion, cfg.d_sae), "exactly one of them"),
            (cfg.expansion is None or cfg.expansion > 0, f"sae.{key}.expansion", cfg.expansion, positive),
            (cfg.d_sae is None or cfg.d_sae > 0, f"sae.{key}.d_sae", cfg.d_sae, positive),
            (cfg.batch_size > 0, f"sae.{key}.batch_size", cfg.batch_size, positive),
            (cfg.lr > 0, f"sae.{key}.lr", cfg.lr, "> 0"),
            (cfg.epochs > 0, f"sae.{key}.epochs", cfg.epochs, positive),
            (cfg.architecture in ARCHITECTURES, f"sae.{key}.architecture", cfg.architecture, ", ".join(ARCHITECTURES)),
            (not cfg.skip or cfg.target_hook, f"sae.{key}.skip", cfg.skip, "true only with a target_hook"),
            (cfg.guide is None or cfg.guide.coeff >= 0, f"sae.{key}.guide.coeff", cfg.guide and cfg.guide.coeff,
             ">= 0"),
            (cfg.guide is None or not cfg.target_hook, f"sae.{key}.guide", cfg.guide,
             "none for a transcoder (its reconstruction is another hook's)"),
            *(_documents_checks(f"sae.{key}.documents", cfg.documents) if cfg.documents else []),
        ]  # fmt: skip
    for i, task in enumerate(params.probe.across):
        checks += _documents_checks(f"probe.across[{i}]", task)
    checks.append((len(params.probe.across) in (0, 2), "probe.across", params.probe.across,
                   "no task, or two to compare"))  # fmt: skip
    for where, values in [("train", t)] + [(f"sae.{key}", cfg) for key, cfg in params.sae.items()]:
        checks += _setting_checks(where, values)
    for ok, key, value, allowed in checks:
        if not ok:
            raise PipelineError(f"invalid {key}: {value!r} (allowed: {allowed})")


SETTING_RANGES = {  # per-config setting -> (allowed, description); None (unset) is always allowed in sae.<key>
    "hook": (lambda v: bool(v), "a stored hook's name, one of extract.hooks"),
    "target_l0": (lambda v: v > 0, "null or > 0"),
    "target_l0_frac": (lambda v: 0 < v <= 1, "0 < value <= 1"),
    "l1_coeff": (lambda v: v >= 0, ">= 0"),
    "decorrelation_coeff": (lambda v: v >= 0, ">= 0"),
    "warmup_frac": (lambda v: 0 <= v < 1, "0 <= value < 1"),
    "decay_frac": (lambda v: 0 <= v <= 1, "0 <= value <= 1"),
    "k": (lambda v: v > 0, "a positive integer"),
    "k_aux": (lambda v: v > 0, "a positive integer"),
    "aux_coeff": (lambda v: v >= 0, ">= 0"),
    "dead_tokens": (lambda v: v > 0, "a positive integer"),
    "l0_coeff": (lambda v: v >= 0, ">= 0"),
    "jumprelu_bandwidth": (lambda v: v > 0, "> 0"),
    "jumprelu_initial_threshold": (lambda v: v >= 0, ">= 0"),
    "matryoshka_prefixes": (
        lambda v: all(0 < a < 1 for a in v) and all(a < b for a, b in itertools.pairwise(v)),
        "increasing shares of d_sae, each strictly between 0 and 1",
    ),
    "relu_decoder_norm": (lambda v: v in ("free", "unit"), "free or unit"),
}


def _documents_checks(where: str, task: DocumentsConfig) -> list[tuple]:
    operators = (task.operations or []) + (task.any_operation or [])
    return [
        (set(operators) <= set(OPERATORS), where, task, f"operations among {', '.join(OPERATORS)}"),
        ((task.min_steps or 1) <= (task.max_steps or 10**9), where, task, "min_steps <= max_steps"),
    ]


def _setting_checks(where: str, values: Any) -> list[tuple]:
    checks = []
    for name in PER_CONFIG_SETTINGS:
        value = getattr(values, name)
        allowed, description = SETTING_RANGES[name]
        checks.append((value is None or allowed(value), f"{where}.{name}", value, description))
    return checks


def _is_cwd_or_above(path: str) -> bool:
    if is_url(path):
        return False
    resolved, cwd = Path(path.removeprefix(LOCAL_SCHEME)).expanduser().resolve(), Path.cwd().resolve()
    return resolved == cwd or resolved in cwd.parents
