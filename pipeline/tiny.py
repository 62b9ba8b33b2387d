"""Tiny offline assets: a random GPT-2-architecture checkpoint and GSM8K-format rows.

They let the whole pipeline run on a CPU with no hub access (`params-tiny.yaml`), and the tests use them too.
The model's weights are random: only the plumbing, not the numbers, mean anything on them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

NAMES = ["Ann", "Bob", "Cy", "Dee", "Eve", "Fay"]
THINGS = ["apples", "pens", "cards", "marbles", "books"]
BOS = "<|endoftext|>"


def make_rows(n: int, seed: int) -> list[dict]:
    """GSM8K-format rows (question, answer ending in `#### n`) of varied lengths."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, thing = rng.choice(NAMES), rng.choice(THINGS)
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        filler = " ".join(f"{name} also likes {rng.choice(THINGS)}." for _ in range(rng.randint(0, 12)))
        question = f"{name} has {a} {thing}. {filler} {name} buys {b} more. How many {thing} now?"
        answer = f"{name} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} {thing}.\n#### {a + b}"
        rows.append({"question": question, "answer": answer})
    return rows


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


def write_tiny_assets(
    root: Path, shape: str = "tiny", tiktoken_file: Path | None = None, n_train: int = 300, n_test: int = 100
) -> dict[str, Path]:
    """`root/model` (random GPT-2 of `shape` + tokenizer) and `root/gsm8k/{train,test}.jsonl`.

    The tokenizer is GPT-2's real one when `tiktoken_file` is given, else a small BPE trained on the rows.
    """
    root = Path(root)
    write_jsonl(root / "gsm8k" / "train.jsonl", make_rows(n_train, seed=1))
    write_jsonl(root / "gsm8k" / "test.jsonl", make_rows(n_test, seed=2))
    if tiktoken_file is None:
        tokenizer = train_tokenizer([r["question"] + "\n" + r["answer"] for r in make_rows(300, seed=3)])
    else:
        tokenizer = gpt2_tokenizer(tiktoken_file)
    n_layer, n_embd, n_head, n_positions = SHAPES[shape]
    save_tiny_gpt2(root / "model", tokenizer, n_layer, n_embd, n_positions, n_head=n_head)
    return {"model": root / "model", "dataset": root / "gsm8k"}
