"""Tiny offline assets: a GPT-2-architecture checkpoint and GSM8K-format rows.

They let the whole pipeline run on a CPU with no hub access (`params-tiny.yaml`), and the tests use them too.
With `train_steps` the tiny model is trained on the rows' train split (next-token prediction, seeded and
deterministic), so that its activations have structure: zero-ablating its residual stream hurts, splice scores
mean something, and SAE latents pick out digits, operators and the `<<a+b=c>>` calculator annotations. Without
it the weights are random, and only the plumbing means anything.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch

from pipeline.core.progress import progress_bars
from pipeline.params import DataConfig

NAMES = ["Ann", "Bob", "Cy", "Dee", "Eve", "Fay"]
THINGS = ["apples", "pens", "cards", "marbles", "books"]
BOS = "<|endoftext|>"


def make_rows(n: int, seed: int) -> list[dict]:
    """GSM8K-format rows (question, answer ending in `#### n`) of varied lengths, with calculator annotations: one
    step that adds, subtracts or multiplies, or two steps (add, then multiply), so that every label task of
    pipeline/label has more than one class."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, thing = rng.choice(NAMES), rng.choice(THINGS)
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        filler = " ".join(f"{name} also likes {rng.choice(THINGS)}." for _ in range(rng.randint(0, 12)))
        rows.append(_row(rng.choice(KINDS), name, thing, a, b, rng.randint(2, 5), filler))
    return rows


KINDS = ("add", "add", "subtract", "multiply", "add then multiply")


def _row(kind: str, name: str, thing: str, a: int, b: int, c: int, filler: str) -> dict:
    total = a + b
    if kind == "subtract":
        a, b = max(a, b), min(a, b)
        return {"question": f"{name} has {a} {thing}. {filler} {name} gives away {b}. How many {thing} now?",
                "answer": f"{name} has {a} - {b} = <<{a}-{b}={a - b}>>{a - b} {thing}.\n#### {a - b}"}  # fmt: skip
    if kind == "multiply":
        return {"question": f"{name} buys {a} boxes of {c} {thing}. {filler} How many {thing} does {name} have?",
                "answer": f"{name} has {a} * {c} = <<{a}*{c}={a * c}>>{a * c} {thing}.\n#### {a * c}"}  # fmt: skip
    question = f"{name} has {a} {thing}. {filler} {name} buys {b} more"
    answer = f"{name} has {a} + {b} = <<{a}+{b}={total}>>{total} {thing}."
    if kind == "add":
        return {"question": f"{question}. How many {thing} now?", "answer": f"{answer}\n#### {total}"}
    return {"question": f"{question}, then gets {c} times as many. How many {thing} now?",
            "answer": f"{answer}\nThen {total} * {c} = <<{total}*{c}={total * c}>>{total * c} {thing}.\n"
                      f"#### {total * c}"}  # fmt: skip


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def train_tokenizer(texts: list[str], vocab_size: int = 400):
    """A byte-level BPE tokenizer (GPT-2's scheme) trained on `texts`, with `<|endoftext|>` as BOS/EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=BOS, unk_token=BOS)


GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SHAPES = {  # n_layer, n_embd, n_head, n_positions
    "tiny": (4, 64, 4, 256),
    "gpt2-small": (12, 768, 12, 1024),
}


def gpt2_tokenizer(tiktoken_file: Path):
    """GPT-2's real tokenizer from its BPE ranks in tiktoken's format (e.g. ../shared/data/gpt2-tokenizer)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converted = TikTokenConverter(
        vocab_file=str(tiktoken_file), pattern=GPT2_SPLIT_PATTERN, additional_special_tokens=[BOS]
    ).converted()
    return PreTrainedTokenizerFast(tokenizer_object=converted, bos_token=BOS, eos_token=BOS, unk_token=BOS)


def save_tiny_gpt2(
    directory: Path, tokenizer, n_layer: int = 4, n_embd: int = 64, n_positions: int = 256, seed: int = 0,
    n_head: int = 4,
) -> Path:  # fmt: skip
    """A random GPT-2-architecture checkpoint beside `tokenizer`: a directory that loads like a hub id."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


FAMILIES = ("gpt_neox", "llama", "qwen2", "gemma2")  # besides GPT-2, tested end to end (tests/test_families.py)


def save_tiny_family(directory: Path, tokenizer, family: str, seed: int = 0) -> Path:
    """A random checkpoint of another model family (Pythia's GPT-NeoX, Llama, Qwen2, Gemma 2) beside `tokenizer`,
    3 layers of width 64, with random norm weights so that the final norm's formula matters."""
    import transformers

    names = {"gpt_neox": "GPTNeoX", "llama": "Llama", "qwen2": "Qwen2", "gemma2": "Gemma2"}
    config_class = getattr(transformers, f"{names[family]}Config")
    model_class = getattr(transformers, f"{names[family]}ForCausalLM")
    grouped = {} if family == "gpt_neox" else {"num_key_value_heads": 2}  # grouped-query attention
    config = config_class(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        **grouped, **({"head_dim": 16} if family == "gemma2" else {}),
    )  # fmt: skip
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():
        for module in model.modules():
            if "Norm" in type(module).__name__ and getattr(module, "weight", None) is not None:
                centre = 0.0 if family == "gemma2" else 1.0  # Gemma scales by 1 + w
                module.weight.normal_(centre, 0.3)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_tiny_assets(
    root: Path,
    shape: str = "tiny",
    tiktoken_file: Path | None = None,
    n_train: int = 300,
    n_test: int = 100,
    rows: dict[str, list[dict]] | None = None,
    train_steps: int = 0,
) -> dict[str, Path]:
    """`root/model` (a GPT-2 of `shape` + tokenizer) and `root/gsm8k/{train,test}.jsonl`.

    The rows are `rows` (e.g. real GSM8K) when given, else generated ones. The tokenizer is GPT-2's real one when
    `tiktoken_file` is given, else a small BPE trained on the train rows. With `train_steps` > 0 the model is then
    trained on the train rows (`train_tiny_gpt2`), and `root/model/training.json` records its losses.
    """
    root = Path(root)
    rows = rows or {"train": make_rows(n_train, seed=1), "test": make_rows(n_test, seed=2)}
    for split, split_rows in rows.items():
        write_jsonl(root / "gsm8k" / f"{split}.jsonl", split_rows)
    # The documents as extraction renders them (data.template's default), so the model learns what it will be shown.
    texts = {split: [DataConfig.template.format(**r) for r in split_rows] for split, split_rows in rows.items()}
    if tiktoken_file is None:
        tokenizer = train_tokenizer(texts["train"], vocab_size=400 if len(texts["train"]) <= 1000 else 1024)
    else:
        tokenizer = gpt2_tokenizer(tiktoken_file)
    n_layer, n_embd, n_head, n_positions = SHAPES[shape]
    model_dir = save_tiny_gpt2(root / "model", tokenizer, n_layer, n_embd, n_positions, n_head=n_head)
    if train_steps > 0:
        train_tiny_gpt2(model_dir, texts["train"], texts.get("test", []), train_steps)
    return {"model": root / "model", "dataset": root / "gsm8k"}


def train_tiny_gpt2(
    directory: Path, train_texts: list[str], test_texts: list[str], steps: int, seed: int = 0,
    batch_size: int = 32, lr: float = 3e-3,
) -> dict:  # fmt: skip
    """Train the checkpoint in `directory` in place on `train_texts`, each as BOS + its tokens (as extraction
    feeds documents), then record the mean next-token loss on `test_texts` in `directory/training.json`.

    Seeded: the same call gives the same weights on the same machine (batches come from a seeded generator, and
    nothing else is random). Adam with a linear warmup over the first 5% of steps and a cosine decay to 10%.
    """
    from transformers import AutoTokenizer, GPT2LMHeadModel

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = GPT2LMHeadModel.from_pretrained(directory)
    n_ctx = model.config.n_positions
    train = _documents(tokenizer, train_texts, n_ctx)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    losses = []
    with progress_bars({"train tiny model": steps}, unit="step") as bars:
        for _ in range(steps):
            chosen = torch.randint(len(train), (batch_size,), generator=generator).tolist()
            ids, mask = _padded([train[i] for i in chosen])
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bars["train tiny model"].advance(1, loss=losses[-1])
    model.eval()
    record = {
        "steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr, "train_documents": len(train),
        "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
        **_held_out_loss(model, _documents(tokenizer, test_texts, n_ctx)),
        "uniform_loss": math.log(len(tokenizer)),
    }  # fmt: skip
    model.save_pretrained(directory)
    (Path(directory) / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _documents(tokenizer, texts: list[str], n_ctx: int) -> list[torch.Tensor]:
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [torch.tensor([tokenizer.bos_token_id, *ids][:n_ctx]) for ids in encoded]


def _padded(documents: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.nn.utils.rnn.pad_sequence(documents, batch_first=True, padding_value=0)
    mask = (torch.arange(ids.shape[1]) < torch.tensor([len(d) for d in documents])[:, None]).long()
    return ids, mask


def _held_out_loss(model, documents: list[torch.Tensor], batch_size: int = 64) -> dict:
    """Mean next-token loss over every predicted token of `documents` (the test split)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(documents), batch_size):
            ids, mask = _padded(documents[start : start + batch_size])
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="sum")
            total, count = total + loss.item(), count + int((targets != -100).sum())
    return {"held_out_loss": total / count if count else None, "held_out_tokens": count}
