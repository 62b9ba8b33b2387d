"""Benchmarks measured as ratios within one run (absolute times on shared machines are not comparable).

1. extract efficiency      extraction tokens/s / the same weights as a plain `transformers` model (its default
                           attention), run on the same batches up to the hooked layer: a reference outside our
                           code and outside TransformerLens, whose output equals the deepest hook's activation
1b. bridge overhead        TransformerBridge forward to the hooked layer (no hooks, no storage) time / that plain
                           `transformers` forward's time: what TransformerLens itself costs (with fused attention)
1c. ... eager attention    the same with a no-op hook on every attention pattern, which sends each layer through
                           TransformerLens's own attention code (`model.attn_implementation: eager`)
2. extract speed-up        extraction tokens/s / per-document run_with_cache over the whole model
3. train efficiency        FLOP/s of a config-C training step / FLOP/s of its six matrix products alone
4. loader stall            share of training wall time spent waiting for data (streamed out of core from the
                           store through a budget of a quarter of its size)
5. one read for all        wall time of --config all / sum of the single-config runs
5b. trainer vs minimal     time of a plain PyTorch training loop (same SAE, loss and Adam, shuffled batches gathered
                           from the same device-resident data; `minimal_sae_training`) / time of `Trainer.fit`
                           training config C alone on the same data and steps
5c. ... at a small shape   the same at SMALL_STEP's shape (1,024 tokens × 64 → 256 latents, 100 steps), where a step
                           takes a few milliseconds on a CPU: the trainer's own work per step, as a GPU step sees it
6. store read speed        bytes/s of reading a whole split through the store (`read_rows`) / bytes/s of
                           `np.fromfile` of the same shard files, one after another
6b. streamed read speed    bytes/s of an epoch streamed through the loader (shuffled windows, float32 blocks on the
                           device; no training) / the same `np.fromfile` bytes/s
6c. store write speed      bytes/s of the StoreWriter writing full shards of two hooks through its background
                           writers, checksums included, as extraction writes them / the same bytes written to new
                           files with numpy's `tofile` on the same filesystem, one thread
7. decorrelation cost      decorrelation forward+backward time / config-C step time
8. <arch> step cost        a training step of that architecture / a ReLU step, same shape (config C) and batch
8b. topk selection share   the top-k selection alone (ReLU, topk, scatter over [batch, d_sae]) / a topk step
8c. guided step cost       a ReLU step with a guide's term (sae.<key>.guide: a frozen 12-class probe of the
                           reconstruction, cross-entropy over labelled tokens) / the ReLU step, same shape and batch
8d. compiled step speed-up a relu and a topk step at config C's shape / the same with `train.torch_compile`
                           (`bench_compiled_step`; in bench/device-check.sh only, not `pipeline bench`: compiling
                           takes longer than the rest of a CPU bench)
9. analyze vs evaluate     `pipeline analyze`'s computation for config C's width / `pipeline evaluate`'s (reconstruction
                           metrics and splice scores) for the same SAE on the same documents (the extraction figures')
9d. label vs tokenize      tokens/s of labelling the last split of `data.splits` (pipeline/label: tokenizing again with
                           character offsets, the labels of the text, per token) / tokens/s of the model's tokenizer
                           alone on the same documents (`tokenizer(documents)`, as extraction calls it)
9e. probe vs evaluate      `pipeline probe`'s computation for that SAE (its sample read, dense, sparse and per-latent
                           probes of every problem) / `pipeline evaluate`'s, on the same documents
9b. splice efficiency      forwards of the whole model as plain `transformers` runs them (logits, same batches), as
                           many as the splice's passes / evaluate's splice scores for the configs' widths (up to
                           three SAEs: six passes, clean, two zero-ablations and three spliced) on the first
                           SPLICE_DOCS documents
9c. synthetic generation   generating one batch of the SynthSAEBench-16k recipe's samples (1,024 of 16,384
                           features in 768 dimensions) on the training device / one training step of a ReLU SAE of
                           4,096 latents on such a batch: below 1, a streamed run's generator keeps up with one SAE
10-12. scaling             several processes against one (`bench/scaling.py`; skipped by --no-scaling,
                           and on CUDA with fewer GPUs than processes)
Start-up (seconds, not a ratio): each stage's fixed cost, `pipeline <stage>` on a run too small for its own work to
count (`bench/startup.py`)

FLOPs of a step (stated, not profiled): the encoder and decoder products each cost 2*B*d*s in the forward pass
and twice that in the backward pass (gradient of the input and of the weight), so a step is 12*B*d*s FLOPs;
the decorrelation Gram matrix (2*s*d^2 forward) and the elementwise work are not counted as useful FLOPs.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bench import scaling as scaling_figures
from bench import startup as startup_costs
from bench.reference import bench_config, minimal_sae_training, reference_config, timed, timed_interleaved
from pipeline.core.device import (
    amp_dtype,
    autocast,
    extraction_batch_tokens,
    grad_scaler,
    resolve_device,
    synchronize,
)
from pipeline.core.errors import PipelineError
from pipeline.corpus import load_documents, load_rendered, padded, plan_batches, start_token, tokenize
from pipeline.extract.shards import ShardExtractor, extract_pending
from pipeline.model import capture, check_hooks, load_model
from pipeline.params import GuideConfig, Params, SAEConfig, SynthConfig, TrainConfig
from pipeline.saes import ARCHITECTURES, build_sae
from pipeline.saes.base import decorrelation, keep_top
from pipeline.store import ActivationStore
from pipeline.store.background import BackgroundWriter, default_workers
from pipeline.store.writer import StoreWriter
from pipeline.train.loader import ActivationLoader
from pipeline.train.trainer import Trainer, compiled_loss, train_step

NAIVE_DOCS = 50  # the naive per-document baseline is slow: measured on the first documents only
SPLICE_DOCS = 16  # six passes of the whole model with its vocabulary: slow on a CPU
GOALS = {
    "extract_efficiency": 0.85, "bridge_overhead": 1.15, "train_efficiency": 0.6, "trainer_vs_minimal": 0.95,
    "trainer_vs_minimal_small": 0.9, "loader_stall": 0.05, "store_read_ratio": 0.8, "streamed_read_ratio": 0.7,
    "decorrelation_cost": 0.15, "analyze_vs_evaluate": 1.0, "store_write_ratio": 0.6, "splice_efficiency": 0.7,
    "label_vs_tokenize": 0.5, "probe_vs_evaluate": 1.0, "guided_step_cost": 1.15,
}  # fmt: skip
L0_OF_BENCH_SAE = 64
STORE_WRITE_BYTES = 2**28  # figure 6c writes at most this much a run
SMALL_STEP = (1024, 64, 256, 100)  # figure 5c: tokens a step, width, latents, steps
SCALING_FIGURES = ("extract_2proc_vs_1proc", "train_2proc_vs_1proc", "ddp_communication_share")
LOWER_IS_BETTER = {
    "bridge_overhead", "ddp_communication_share", "loader_stall", "decorrelation_cost", "analyze_vs_evaluate",
    "synth_generation_vs_step", "probe_vs_evaluate", "guided_step_cost",
}  # fmt: skip


def plain_transformers_forward(params: Params, n_blocks: int, dtype: torch.dtype, device: torch.device) -> Callable:
    """The model as plain `transformers` loads it, stopped after `n_blocks` blocks (GPT-2-architecture models)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(params.model.name, revision=params.model.revision, dtype=dtype)
    body = getattr(model, "transformer", None)
    if body is None or not hasattr(body, "h"):
        raise PipelineError(f"the bench's plain-transformers reference supports GPT-2-architecture models only, "
                            f"not {type(model).__name__}")  # fmt: skip
    body.h = body.h[:n_blocks]
    body.ln_f = torch.nn.Identity()  # the output is then the residual stream after block n_blocks - 1
    body.to(device).eval()

    def forward(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return body(input_ids=ids, attention_mask=mask).last_hidden_state

    return forward


def bench_extract(params: Params, model, n_docs: int, workdir: Path) -> dict:
    """Figures 1, 1b, 1c and 2 on the first `n_docs` documents of the test split, with `model` (params.model loaded)."""
    hooks = params.extract.hooks
    stop = check_hooks(model, hooks)
    device = next(model.parameters()).device
    docs = load_documents(replace(params.data, max_docs=n_docs), params.data.splits[-1])
    data = tokenize(docs, model.tokenizer, start_token(model.tokenizer, params.data.bos)[0], model.cfg.n_ctx)
    n_tokens = int(data.doc_offsets[-1])
    lengths = np.diff(data.doc_offsets)
    batch_tokens = extraction_batch_tokens(params.extract.batch_tokens, device)
    batches = plan_batches(lengths, np.arange(data.n_docs), batch_tokens)
    inputs = [padded(batch, data.tokens, data.doc_offsets, device) for batch in batches]

    def bare(fwd_hooks: list | None = None) -> None:
        with torch.inference_mode():
            for ids, mask in inputs:
                model.run_with_hooks(
                    ids,
                    attention_mask=mask,
                    fwd_hooks=fwd_hooks or [],
                    stop_at_layer=stop if stop < model.cfg.n_layers else None,
                    return_type=None,
                )

    # A hook on every attention pattern sends each layer through TransformerLens's own attention code, as
    # `model.attn_implementation: eager` does: the bridge as it was before pipeline/attention.py.
    patterns = [(f"blocks.{layer}.attn.hook_pattern", lambda pattern, hook: None) for layer in range(stop)]

    attrs = {"hooks": hooks, "d_model": model.cfg.d_model, "dtype": params.extract.dtype, "splits": ["bench"],
             "shard_tokens": params.extract.shard_tokens, "chunk_tokens": params.extract.chunk_tokens}  # fmt: skip
    extractor = ShardExtractor(model, hooks, stop, batch_tokens, getattr(torch, params.extract.dtype))

    def extract() -> None:
        writer = StoreWriter(workdir / "bench-store", attrs, resume=False)
        writer.add_split("bench", data.tokens, data.doc_offsets)
        extract_pending(writer, extractor, {"bench": data}, writer.all_pending_shards())
        writer.finalize({"bos_token_id": int(data.tokens[0])})  # as the stage does: checksums, rename

    naive_docs = min(data.n_docs, NAIVE_DOCS)

    def naive() -> None:
        with torch.inference_mode():
            for doc in range(naive_docs):
                ids = torch.from_numpy(data.tokens[data.doc_offsets[doc] : data.doc_offsets[doc + 1]]).long()
                model.run_with_cache(ids[None].to(device), names_filter=lambda name: name in hooks)

    hf_forward = plain_transformers_forward(params, stop, next(model.parameters()).dtype, device)

    def plain() -> None:
        for ids, mask in inputs:
            hf_forward(ids, mask)

    runs = {"plain": plain, "bare": bare, "eager": lambda: bare(patterns), "extract": extract}
    times = timed_interleaved(runs, device, repeats=3)
    t_plain, t_bare, t_extract = times["plain"], times["bare"], times["extract"]
    t_naive = timed(naive, device, repeats=1, warmup=False)  # slow, and the model is warm by now
    naive_tokens = int(data.doc_offsets[naive_docs])
    return {
        "n_docs": data.n_docs,
        "n_tokens": n_tokens,
        "batch_tokens": batch_tokens,
        "plain_transformers_tokens_per_s": n_tokens / t_plain,
        "bridge_forward_tokens_per_s": n_tokens / t_bare,
        "bridge_eager_attention_tokens_per_s": n_tokens / times["eager"],
        "extract_tokens_per_s": n_tokens / t_extract,
        "naive_tokens_per_s": naive_tokens / t_naive,
        "extract_efficiency": t_plain / t_extract,
        "bridge_overhead": t_bare / t_plain,
        "bridge_overhead_eager_attention": times["eager"] / t_plain,
        "extract_speedup_over_naive": (n_tokens / t_extract) / (naive_tokens / t_naive),
        "plain_transformers_vs_hook": _reference_agreement(model, hf_forward, inputs[0], hooks, stop),
        "d_model": int(model.cfg.d_model),
    }


def _reference_agreement(model, hf_forward: Callable, batch: tuple, hooks: list[str], stop: int) -> dict:
    """Largest difference between the plain forward's output and the hook it should equal, on one batch."""
    hook = f"blocks.{stop - 1}.hook_resid_post"
    if hook not in hooks:
        return {"hook": hook, "compared": False, "why": "that hook is not extracted"}
    ids, mask = batch
    real = mask.bool()
    ours = capture(model, ids, mask, [hook], stop)[hook][real].float()
    diff = (hf_forward(ids, mask)[real].float() - ours).abs().max().item()
    return {"hook": hook, "compared": True, "max_abs_diff": diff, "max_abs_activation": ours.abs().max().item()}


def bench_train_step(device: torch.device, amp: str, d_in: int, d_sae: int, batch_tokens: int) -> dict:
    """Figures 3 and 7: one SAE step against its six matrix products, and the decorrelation term's share."""
    dtype = amp_dtype(amp, device)
    cfg = bench_config(d_sae, l1_coeff=1e-3)
    torch.manual_seed(0)
    sae = build_sae(cfg, d_in).to(device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)
    scaler = grad_scaler(device, dtype)
    x = torch.randn(batch_tokens, d_in, device=device)

    def step() -> None:  # the trainer's own step, on a non-logging step (no L0 pass)
        train_step(sae, optimizer, scaler, x, dtype, cfg, logged=False)

    mm_dtype = dtype or torch.float32
    a = torch.randn(batch_tokens, d_in, device=device, dtype=mm_dtype)
    w_enc = torch.randn(d_in, d_sae, device=device, dtype=mm_dtype)
    w_dec = torch.randn(d_sae, d_in, device=device, dtype=mm_dtype)
    f = torch.randn(batch_tokens, d_sae, device=device, dtype=mm_dtype)

    def matmuls() -> None:  # the six products of a step: forward, then input and weight gradients
        a @ w_enc, f @ w_dec, a @ w_dec.T, f.T @ a, f @ w_enc.T, a.T @ f

    def decorrelation_only() -> None:
        w = sae.W_dec.detach().clone().requires_grad_(True)
        with autocast(device, dtype):
            decorrelation(w.float()).backward()

    flops = 12 * batch_tokens * d_in * d_sae
    t_step, t_mm, t_decor = timed(step, device), timed(matmuls, device), timed(decorrelation_only, device)
    return {
        "shape": {"batch_tokens": batch_tokens, "d_in": d_in, "d_sae": d_sae, "dtype": str(mm_dtype)},
        "flops_per_step": flops,
        "step_s": t_step,
        "step_flops_per_s": flops / t_step,
        "matmul_flops_per_s": flops / t_mm,
        "train_efficiency": t_mm / t_step,
        "decorrelation_s": t_decor,
        "decorrelation_cost": t_decor / t_step,
    }


def bench_architectures(device: torch.device, amp: str, d_in: int, d_sae: int, batch_tokens: int, k: int) -> dict:
    """Figure 8: each architecture's training step against the ReLU step, and what TopK's selection costs."""
    dtype = amp_dtype(amp, device)
    x = torch.randn(batch_tokens, d_in, device=device)

    def step_of(name: str, guide: Callable | None = None) -> Callable[[], object]:
        cfg = bench_config(d_sae, name, k=k, dead_tokens=1)  # every latent is dead: AuxK always runs (worst case)
        if guide is not None:
            cfg = replace(cfg, guide=GuideConfig(task="operation", coeff=0.1))
        return _training_step(cfg, x, dtype, guide)

    pre = torch.randn(batch_tokens, d_sae, device=device, dtype=dtype or torch.float32)
    fns = {name: step_of(name) for name in ARCHITECTURES}
    fns["relu_guided"] = step_of("relu", _bench_guide(batch_tokens, d_in, device))
    fns["topk_selection"] = lambda: keep_top(torch.relu(pre), k, dim=-1)
    seconds = timed_interleaved(fns, device)
    return {
        "shape": {"batch_tokens": batch_tokens, "d_in": d_in, "d_sae": d_sae, "k": k},
        "step_s": seconds,
        "step_cost": {name: seconds[name] / seconds["relu"] for name in ARCHITECTURES if name != "relu"},
        "guided_step_cost": seconds["relu_guided"] / seconds["relu"],
        "topk_selection_share": seconds["topk_selection"] / seconds["topk"],
    }


def bench_compiled_step(device: torch.device, amp: str, d_in: int, d_sae: int, batch_tokens: int, k: int,
                        backend: str = "inductor") -> dict:  # fmt: skip
    """Figure 8d, for the device check only (compiling takes longer than a CPU bench's other figures): a training
    step with its loss compiled as `train.torch_compile` compiles it (by `backend`), against the eager step, for
    relu (one graph) and topk (its dead-latent check breaks the graph); the first, compiling step is not timed."""
    dtype = amp_dtype(amp, device)
    x = torch.randn(batch_tokens, d_in, device=device)
    steps = {
        f"{name}_{kind}": _training_step(
            bench_config(d_sae, name, k=k), x, dtype, compiled_by=backend if kind == "compiled" else None
        )
        for name in ("relu", "topk")
        for kind in ("eager", "compiled")
    }
    seconds = timed_interleaved(steps, device, repeats=5)
    return {
        "shape": {"batch_tokens": batch_tokens, "d_in": d_in, "d_sae": d_sae, "k": k, "backend": backend},
        "step_s": seconds,
        "compiled_speedup": {name: seconds[f"{name}_eager"] / seconds[f"{name}_compiled"] for name in ("relu", "topk")},
    }


def _training_step(cfg: SAEConfig, x: torch.Tensor, dtype: torch.dtype | None, guide: Callable | None = None,
                   compiled_by: str | None = None) -> Callable[[], object]:  # fmt: skip
    """A non-logged training step of a fresh SAE of `cfg` on the batch `x`; with `compiled_by` (a torch.compile
    backend), its loss compiled as `train.torch_compile` compiles it."""
    sae = build_sae(cfg, x.shape[1]).to(x.device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)
    scaler = grad_scaler(x.device, dtype)
    loss_of = None if compiled_by is None else compiled_loss(sae, compiled_by)
    return lambda: train_step(sae, optimizer, scaler, x, dtype, cfg, logged=False, guide=guide, loss_of=loss_of)


def _bench_guide(batch_tokens: int, d_in: int, device: torch.device) -> Callable:
    """A guide's term for one batch as training computes it: a probe of 12 classes (as many as GSM8K's operation
    task has), two tokens in three labelled (more than any task but region and number labels)."""
    from pipeline.probe.guide import GuideProbe

    probe = GuideProbe("operation", [str(c) for c in range(12)], list(range(12)), torch.randn(12, d_in, device=device),
                       torch.zeros(12, device=device))  # fmt: skip
    labels = torch.randint(0, 12, (batch_tokens,), generator=torch.Generator().manual_seed(0))
    labels[::3] = -1
    return probe.loss(labels.to(device), scale=1.0)


def bench_analyze_vs_evaluate(
    params: Params, model, store: ActivationStore, split: str, d_sae: int, n_docs: int
) -> dict:
    """Figures 9 and 9e on the extraction figures' store (the first `n_docs` documents of the test split): a random
    SAE of config C's width whose encoder biases make each latent fire on its share of `L0_OF_BENCH_SAE` per token
    (about what a trained SAE fires; a random one with zero biases fires half its latents), analysed, evaluated and
    probed on the same tokens."""
    from pipeline.analyze.features import analyze
    from pipeline.analyze.logits import vocabulary_of
    from pipeline.evaluate.reconstruction import reconstruction_metrics
    from pipeline.evaluate.splice import splice_scores

    device = next(model.parameters()).device
    hooks = store.attrs["hooks"]
    hook = params.train.hook if params.train.hook in hooks else hooks[-1]
    sae = build_sae(bench_config(d_sae), store.d_model, generator=torch.Generator().manual_seed(0))
    sample = torch.from_numpy(store.read_rows(split, hook, 0, min(4096, store.activations(split, hook).shape[0])))
    with torch.no_grad():
        pre = (sample.float() - sae.b_dec) @ sae.W_enc
        sae.b_enc.copy_(-pre.quantile(1 - L0_OF_BENCH_SAE / sae.d_sae, dim=0))
    sae = sae.to(device).eval()
    loader = ActivationLoader(store, split, hook, device, params.train.seed, params.train.exclude_bos)
    tokens, offsets = store.tokens(split), store.doc_offsets(split)
    vocabulary = vocabulary_of(model, device)

    def analysis() -> None:
        analyze(sae, loader, tokens, offsets, params.analyze, params.train.seed, vocabulary)

    def evaluation() -> None:
        reconstruction_metrics(sae, loader.epoch(0, params.evaluate.batch_tokens), params.evaluate.dense_threshold)
        splice_scores(model, tokens, offsets, hook, {"c": lambda x: sae(x)[0]}, params.evaluate.batch_tokens)

    probing = _probing(params, model, store, split, n_docs, loader, sae)
    times = timed_interleaved({"analyze": analysis, "evaluate": evaluation, "probe": probing}, device, repeats=1)
    with torch.no_grad():
        fired = sae.encode(next(loader.in_order(4096))[1].to(device)) > 0  # the first analysed tokens
    return {
        "tokens": loader.n_tokens, "d_sae": sae.d_sae, "l0": fired.sum(1).float().mean().item(), "hook": hook,
        "bos_token_id": int(store.attrs["bos_token_id"]),
        "analyze_s": times["analyze"], "evaluate_s": times["evaluate"], "probe_s": times["probe"],
        "analyze_vs_evaluate": times["analyze"] / times["evaluate"],
        "probe_vs_evaluate": times["probe"] / times["evaluate"],
    }  # fmt: skip


def _probing(params: Params, model, store: ActivationStore, split: str, n_docs: int, loader, sae) -> Callable:
    """What `pipeline probe` computes for `sae` on the store's split, given its token labels (made here)."""
    from pipeline.corpus import TokenizedSplit
    from pipeline.label.label_set import final_classes, label_split
    from pipeline.label.structure import OperationClasses
    from pipeline.probe.fit import probe_problems
    from pipeline.probe.problems import document_halves, problems
    from pipeline.probe.sample import read_sample

    documents = load_rendered(replace(params.data, max_docs=n_docs), params.data.splits[-1])
    operations = OperationClasses()
    tokens = TokenizedSplit(store.tokens(split), store.doc_offsets(split), n_truncated=0)
    labelled = label_split(documents, tokens, model.tokenizer, int(model.cfg.n_ctx), operations)
    classes = final_classes({split: labelled}, operations)
    offsets = store.doc_offsets(split)
    halves = np.repeat(document_halves(len(offsets) - 1, params.probe.seed), np.diff(offsets))
    pc = params.probe

    def probe() -> None:
        found, _ = problems(labelled.labels, classes, halves, pc.min_positives, pc.max_per_class, pc.seed)
        sample = np.unique(np.concatenate([p.tokens[half] for p in found for half in p.tokens]))
        read = read_sample(loader, {"c": sae}, sample, halves, params.train.memory_budget_gb)
        probe_problems(found, read, pc.k)

    return probe


def bench_labels(params: Params, tokenizer, bos_token_id: int, n_ctx: int) -> dict:
    """Figure 9d on the last split of `data.splits`, whole: labelling its stored tokens (as `pipeline label` does,
    from the store's tokens) against tokenizing its documents."""
    from pipeline.label.label_set import label_split
    from pipeline.label.structure import OperationClasses

    documents = load_rendered(params.data, params.data.splits[-1])
    texts = [d.text for d in documents]
    stored = tokenize(texts, tokenizer, bos_token_id, n_ctx)  # what the store holds
    runs = {
        "tokenize": lambda: tokenizer(texts, add_special_tokens=False),
        "label": lambda: label_split(documents, stored, tokenizer, n_ctx, OperationClasses()),
    }
    times = timed_interleaved(runs, torch.device("cpu"), repeats=3)
    n_tokens = sum(map(len, tokenizer(texts, add_special_tokens=False)["input_ids"]))
    return {"documents": len(documents), "tokens": n_tokens, "tokenize_s": times["tokenize"],
            "label_s": times["label"], "label_vs_tokenize": times["tokenize"] / times["label"]}  # fmt: skip


def bench_splice(params: Params, model, hook: str) -> dict:
    """Figure 9b with `model` (params.model loaded) at `hook`."""
    from transformers import AutoModelForCausalLM

    from pipeline.evaluate.splice import splice_scores

    device = next(model.parameters()).device
    docs = load_documents(replace(params.data, max_docs=SPLICE_DOCS), params.data.splits[-1])
    data = tokenize(docs, model.tokenizer, start_token(model.tokenizer, params.data.bos)[0], model.cfg.n_ctx)
    batch_tokens = params.evaluate.batch_tokens
    lengths = np.diff(data.doc_offsets)
    inputs = [padded(b, data.tokens, data.doc_offsets, device) for b in plan_batches(lengths, np.arange(data.n_docs),
                                                                                    batch_tokens)]  # fmt: skip
    dtype = next(model.parameters()).dtype
    plain = AutoModelForCausalLM.from_pretrained(params.model.name, revision=params.model.revision, dtype=dtype)
    plain = plain.to(device).eval()
    d_model = int(model.cfg.d_model)
    widths = [cfg.width(d_model) for cfg in params.sae.values()][:3]
    saes = {f"x{i}": build_sae(bench_config(w), d_model, torch.Generator().manual_seed(i)).to(device).eval()
            for i, w in enumerate(widths)}  # fmt: skip
    reconstructions = {key: (lambda x, sae=sae: sae(x)[0]) for key, sae in saes.items()}

    def six_forwards() -> None:
        with torch.inference_mode():
            for _ in range(3 + len(saes)):  # as many as the splice's passes
                for ids, mask in inputs:
                    plain(input_ids=ids, attention_mask=mask)  # computes the logits, as the splice needs

    def splice() -> None:
        splice_scores(model, data.tokens, data.doc_offsets, hook, reconstructions, batch_tokens)

    times = timed_interleaved({"plain": six_forwards, "splice": splice}, device, repeats=1)
    n_tokens = int(data.doc_offsets[-1])
    return {
        "n_docs": data.n_docs, "n_tokens": n_tokens, "saes": len(saes), "passes": 3 + len(saes),
        "plain_forward_tokens_per_s": 6 * n_tokens / times["plain"], "splice_s": times["splice"],
        "splice_efficiency": times["plain"] / times["splice"],
    }  # fmt: skip


def bench_synth_generation(device: torch.device, amp: str) -> dict:
    """Figure 9c: the 16k recipe's generator against the SAE step that consumes its batch."""
    from pipeline.synth import generator

    recipe = SynthConfig(orthogonalize_steps=0)  # the directions' values do not change the generator's speed
    model = generator.build(recipe, device)
    drawn_with = generator.sample_generator(recipe.seed, "train", 0, device)
    d_sae, batch = 4096, 1024
    generate = timed(lambda: generator.samples(model, batch, drawn_with), device)
    step = bench_train_step(device, amp, recipe.d_model, d_sae, batch)
    return {
        "n_features": recipe.n_features, "d_model": recipe.d_model, "batch": batch, "d_sae": d_sae,
        "generate_s": generate, "samples_per_s": batch / generate, "step_s": step["step_s"],
        "synth_generation_vs_step": generate / step["step_s"],
    }  # fmt: skip


def write_random_store(path: Path, n_tokens: int, d: int) -> ActivationStore:
    """A store of random float16 activations (content does not matter for speed)."""
    shard = 65536
    attrs = {"hooks": ["bench"], "d_model": d, "dtype": "float16", "splits": ["train"], "shard_tokens": shard,
             "chunk_tokens": 4096, "model": "random", "dataset": "random", "n_ctx": 512}  # fmt: skip
    writer = StoreWriter(path, attrs, resume=False)
    writer.add_split("train", np.zeros(n_tokens, np.int32), np.arange(0, n_tokens + 1, 512, dtype=np.int64))
    rng = np.random.default_rng(0)
    for index, start, end in writer.pending_shards("train"):
        writer.write_shard(
            "train", index, start, {"bench": rng.standard_normal((end - start, d), np.float32).astype(np.float16)}
        )
    writer.finalize({})
    return ActivationStore(path)


def bench_training_runs(params: Params, store: ActivationStore, device: torch.device, width: int) -> dict:
    """Figures 4 and 5: loader stall when streaming, and one shared read against three separate runs."""
    train = replace(params.train, hook="bench", device=str(device), exclude_bos=False, checkpoint_every=10**9)
    configs = {
        k: SAEConfig(batch_size=c.batch_size, lr=c.lr, expansion=c.expansion, d_sae=c.d_sae, epochs=1)
        for k, c in params.sae.items()
    }

    def fit(which: list[str], budget_gb: float) -> tuple[float, float]:
        loader = ActivationLoader(store, "train", "bench", device, train.seed, False, budget_gb)
        trainer = Trainer({k: configs[k] for k in which}, loader, replace(train, memory_budget_gb=budget_gb),
                          Path(tempfile.mkdtemp()), {"hook": "bench"})  # fmt: skip
        synchronize(device)
        start = time.perf_counter()
        trainer.fit()
        synchronize(device)
        return time.perf_counter() - start, loader.stall_seconds

    wall_all, _ = fit(list(configs), 1e9)
    singles = {k: fit([k], 1e9)[0] for k in configs}
    wall_streamed, stall = fit(list(configs), streaming_budget_gb(store))
    widest, _ = reference_config(params, width)
    cfg = configs[widest]
    loader = ActivationLoader(store, "train", "bench", device, train.seed, False, 1e9)
    batch = cfg.batch_size * train.seq_len
    minimal_s = minimal_sae_training(
        loader.data, cfg.width(width), batch, loader.n_tokens // batch, cfg.lr, train.l1_coeff,
        train.decorrelation_coeff, amp_dtype(train.amp, device),
    )  # fmt: skip
    return {
        "tokens": store.activations("train", "bench").shape[0],
        "d_in": width,
        "all_configs_wall_s": wall_all,
        "single_configs_wall_s": singles,
        "single_configs_wall_s_sum": sum(singles.values()),
        "one_read_ratio": wall_all / sum(singles.values()),
        "minimal_loop_config": widest,
        "minimal_loop_wall_s": minimal_s,
        "trainer_vs_minimal": minimal_s / singles[widest],
        "streamed_wall_s": wall_streamed,
        "streamed_stall_s": stall,
        "loader_stall": stall / wall_streamed,
    }


def bench_small_step(workdir: Path, device: torch.device, amp: str) -> dict:
    """Figure 5c: `Trainer.fit` against the plain loop where a step is short (SMALL_STEP), so that the trainer's
    own work per step (schedule, bookkeeping, batch gathering) is what the ratio sees."""
    batch, width, d_sae, steps = SMALL_STEP
    store = write_random_store(workdir / "small-step-store", batch * steps, width)
    train = replace(TrainConfig(), hook="bench", device=str(device), exclude_bos=False, checkpoint_every=10**9,
                    seq_len=batch, log_every=10**9, amp=amp)  # fmt: skip
    configs = {"s": SAEConfig(batch_size=1, lr=1e-4, d_sae=d_sae, epochs=1)}
    loader = ActivationLoader(store, "train", "bench", device, train.seed, False, 1e9)
    times = timed_interleaved({
        "trainer": lambda: Trainer(configs, loader, train, Path(tempfile.mkdtemp()), {"hook": "bench"}).fit(),
        "minimal": lambda: minimal_sae_training(loader.data, d_sae, batch, steps, 1e-4, train.l1_coeff,
                                                train.decorrelation_coeff, amp_dtype(amp, device)),
    }, device, repeats=5)  # fmt: skip
    return {
        "tokens_per_step": batch, "d_in": width, "d_sae": d_sae, "steps": steps,
        "trainer_s_per_step": times["trainer"] / steps, "minimal_s_per_step": times["minimal"] / steps,
        "trainer_vs_minimal_small": times["minimal"] / times["trainer"],
    }  # fmt: skip


def streaming_budget_gb(store: ActivationStore) -> float:
    """A loader budget of a quarter of the store's training split: it streams."""
    array = store.activations("train", "bench")
    return array.nbytes / 4 / 2**30


def bench_store_read(store: ActivationStore, device: torch.device) -> dict:
    """Figures 6 and 6b: a whole split read through the store, and an epoch streamed through the loader, against
    `np.fromfile` of the split's shard files (page cache warm for all three: each runs once before timing)."""
    array = store.activations("train", "bench")
    n_rows, nbytes = array.shape[0], array.nbytes
    files = [store.location.path / name for name in store.manifest if name.startswith("train/bench/c/")]
    loader = ActivationLoader(store, "train", "bench", device, 0, False, streaming_budget_gb(store))
    times = timed_interleaved({
        "store": lambda: store.read_rows("train", "bench", 0, n_rows),
        "fromfile": lambda: [np.fromfile(file, dtype=np.uint8) for file in files],
        "streamed": lambda: sum(len(block) for block in loader.epoch(0, 16384, reuse_memory=True)),
    }, device, repeats=5)  # fmt: skip
    return {
        "bytes": nbytes,
        "shard_files": len(files),
        "store_bytes_per_s": nbytes / times["store"],
        "fromfile_bytes_per_s": nbytes / times["fromfile"],
        "store_read_ratio": times["fromfile"] / times["store"],
        "streamed_bytes_per_s": nbytes / times["streamed"],
        "streamed_loader_order": loader.order_kind,
        "streamed_read_ratio": times["fromfile"] / times["streamed"],
    }


def bench_store_write(workdir: Path, n_tokens: int, width: int, chunk_tokens: int, shard_tokens: int) -> dict:
    """Figure 6c on up to `n_tokens` rows (at most STORE_WRITE_BYTES) of two hooks, in at least four full shards.
    Each run removes the previous run's files first, so the disk holds two runs' at most."""
    n_tokens = min(n_tokens, STORE_WRITE_BYTES // (2 * width * 2))
    chunk = min(chunk_tokens, n_tokens // 4)
    shard = max(chunk, min(shard_tokens, n_tokens // 4) // chunk * chunk)
    rows = n_tokens // shard * shard
    rng = np.random.default_rng(0)
    data = {hook: rng.standard_normal((rows, width), dtype=np.float32).astype(np.float16) for hook in ("h1", "h2")}
    attrs = {"hooks": list(data), "d_model": width, "dtype": "float16", "splits": ["w"], "shard_tokens": shard,
             "chunk_tokens": chunk}  # fmt: skip

    def ours() -> None:
        shutil.rmtree(workdir / "write-store.partial", ignore_errors=True)
        writer = StoreWriter(workdir / "write-store", attrs, resume=False)
        writer.add_split("w", np.zeros(rows, np.int32), np.array([0, rows]))
        background = BackgroundWriter(writer)
        for index, start, end in writer.pending_shards("w"):
            background.submit("w", index, start, {hook: values[start:end] for hook, values in data.items()})
        background.close()

    def plain() -> None:
        folder = workdir / "write-plain"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        for start in range(0, rows, shard):
            for hook, values in data.items():
                values[start : start + shard].tofile(folder / f"{hook}-{start}")

    times = timed_interleaved({"store": ours, "numpy": plain}, torch.device("cpu"))
    nbytes = sum(values.nbytes for values in data.values())
    return {
        "bytes": nbytes, "shard_tokens": shard, "writer_threads": default_workers(),
        "store_bytes_per_s": nbytes / times["store"], "numpy_bytes_per_s": nbytes / times["numpy"],
        "store_write_ratio": times["numpy"] / times["store"],
    }  # fmt: skip


def run(params: Params, n_docs: int, n_tokens: int, width: int | None, workdir: Path, scaling: bool = True) -> dict:
    """Every figure; sizes: `n_docs` documents for extraction, `n_tokens` x `width` for the training runs."""
    device = resolve_device(params.train.device)
    model = load_model(params.model)
    extract = bench_extract(params, model, n_docs, workdir)
    d_model = extract["d_model"]
    _, c = reference_config(params, d_model)
    d_sae = c.width(d_model)
    analysis = bench_analyze_vs_evaluate(params, model, ActivationStore(workdir / "bench-store"), "bench", d_sae,
                                         n_docs)  # fmt: skip
    labels = bench_labels(params, model.tokenizer, int(analysis["bos_token_id"]), int(model.cfg.n_ctx))
    splice = bench_splice(params, model, analysis["hook"])
    synth = bench_synth_generation(device, params.train.amp)
    del model  # the model's memory is not the training figures' to share
    step = bench_train_step(device, params.train.amp, d_model, d_sae, c.batch_size * params.train.seq_len)
    arch = bench_architectures(device, params.train.amp, d_model, d_sae, c.batch_size * params.train.seq_len,
                               min(params.train.k, d_sae))  # fmt: skip
    width = width or d_model
    store = write_random_store(workdir / "random-store", n_tokens, width)
    runs = bench_training_runs(params, store, device, width)
    small = bench_small_step(workdir, device, params.train.amp)
    read = bench_store_read(store, device)
    write = bench_store_write(workdir, n_tokens, width, params.extract.chunk_tokens, params.extract.shard_tokens)
    startup = startup_costs.run(params, workdir)
    scaled = scaling_figures.run(params, n_docs, extract["n_tokens"], store, workdir) if scaling else {}
    figures = {
        "extract_efficiency": extract["extract_efficiency"],
        "bridge_overhead": extract["bridge_overhead"],
        "bridge_overhead_eager_attention": extract["bridge_overhead_eager_attention"],
        "extract_speedup_over_naive": extract["extract_speedup_over_naive"],
        "train_efficiency": step["train_efficiency"],
        "loader_stall": runs["loader_stall"],
        "one_read_ratio": runs["one_read_ratio"],
        "trainer_vs_minimal": runs["trainer_vs_minimal"],
        "trainer_vs_minimal_small": small["trainer_vs_minimal_small"],
        "store_read_ratio": read["store_read_ratio"],
        "streamed_read_ratio": read["streamed_read_ratio"],
        "store_write_ratio": write["store_write_ratio"],
        "decorrelation_cost": step["decorrelation_cost"],
        **{f"{name}_step_cost": cost for name, cost in arch["step_cost"].items()},
        "topk_selection_share": arch["topk_selection_share"],
        "guided_step_cost": arch["guided_step_cost"],
        "analyze_vs_evaluate": analysis["analyze_vs_evaluate"],
        "label_vs_tokenize": labels["label_vs_tokenize"],
        "probe_vs_evaluate": analysis["probe_vs_evaluate"],
        "splice_efficiency": splice["splice_efficiency"],
        "synth_generation_vs_step": synth["synth_generation_vs_step"],
        **{name: scaled[name] for name in SCALING_FIGURES if scaled},
    }
    return {
        "device": str(device),
        "figures": figures,
        "goals": GOALS,
        "details": {
            "extract": extract,
            "train_step": step,
            "training_runs": runs,
            "small_step": small,
            "store_read": read,
            "store_write": write,
            "architectures": arch,
            "analysis": analysis,
            "labels": labels,
            "splice": splice,
            "synth_generation": synth,
            "scaling": scaled,
            "startup_s": startup,
        },
    }
