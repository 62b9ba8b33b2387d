"""Rows (pipeline/sources.py) -> documents (text) -> token ids with document offsets -> padded batches."""

from __future__ import annotations

import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.core.errors import PipelineError, first_line
from pipeline.core.location import looks_local
from pipeline.params import DataConfig, ModelConfig
from pipeline.sources import read_split

TOKENIZE_DOCUMENTS = 4096  # documents tokenized at a time, so that data.max_tokens stops early in a large corpus


@dataclass
class TokenizedSplit:
    """Every document of one split as one flat token array; document i is tokens[offsets[i]:offsets[i+1]]."""

    tokens: np.ndarray  # int32 [n_tokens]
    doc_offsets: np.ndarray  # int64 [n_docs + 1]
    n_truncated: int  # documents cut to the model's context length

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1


@dataclass
class Document:
    """One rendered row: its text, and where each template field's value lies in it (character offsets)."""

    text: str
    fields: dict[str, tuple[int, int]]


def load_documents(cfg: DataConfig, split: str) -> list[str]:
    """The split's rows rendered through `cfg.template` (keys: the row's fields, e.g. {question}, {answer})."""
    return [document.text for document in load_rendered(cfg, split)]


def load_rendered(cfg: DataConfig, split: str) -> list[Document]:
    """The split's rows rendered through `cfg.template`, with the span of each field in the text."""
    found = read_split(cfg, split)
    parts = list(string.Formatter().parse(cfg.template))
    fields = [name for _, name, _, _ in parts if name]
    documents = []
    for row, where in zip(found.rows, found.where, strict=True):
        missing = [name for name in fields if row.get(name) is None]
        if missing:
            raise PipelineError(
                f"{where}: no field {', '.join(missing)}, which data.template {cfg.template!r} uses "
                f"(the row has: {', '.join(row) or 'no fields'})"
            )
        documents.append(_render(parts, row))
    return documents


def _render(parts: list[tuple], row: dict) -> Document:
    """What `template.format(**row)` gives, piece by piece, noting where each field's text lands."""
    formatter, text, spans = string.Formatter(), [], {}
    length = 0
    for literal, name, spec, conversion in parts:
        text.append(literal)
        length += len(literal)
        if name is None:
            continue
        value, _ = formatter.get_field(name, (), row)
        piece = formatter.format_field(formatter.convert_field(value, conversion), spec or "")
        spans.setdefault(name, (length, length + len(piece)))
        text.append(piece)
        length += len(piece)
    return Document("".join(text), spans)


def start_token(tokenizer, policy: str) -> tuple[int, str]:
    """The token put before every document under `data.bos`, and the policy in words (recorded in the store).

    TransformerLens gives a tokenizer without a BOS token its EOS token as BOS; whether it had one of its own is
    in the tokenizer's `init_kwargs` (what its files said).
    """
    own_bos = getattr(tokenizer, "init_kwargs", {}).get("bos_token", tokenizer.bos_token)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if policy == "bos" or (policy == "auto" and own_bos is not None):
        if own_bos is None or bos is None:
            raise PipelineError("the tokenizer has no BOS token; set data.bos to eos (or auto) to start documents "
                                "with its EOS token")  # fmt: skip
        return bos, "one BOS token prepended to every document; documents truncated to n_ctx tokens"
    if eos is None:
        raise PipelineError("the tokenizer has neither a BOS nor an EOS token to start documents with")
    why = "the tokenizer has no BOS token" if policy == "auto" else "data.bos: eos"
    return eos, f"one EOS token prepended to every document ({why}); documents truncated to n_ctx tokens"


def tokenize(
    documents: list[str], tokenizer, bos_token_id: int, max_len: int, max_tokens: int | None = None
) -> TokenizedSplit:
    """BOS + each document's tokens, truncated to `max_len` (the model's context); with `max_tokens`, only the
    leading documents whose tokens fit within it."""
    encoded: list[list[int]] = []
    total = 0
    for ids, _ in encode(documents, tokenizer):
        total += min(len(ids) + 1, max_len)
        if max_tokens is not None and total > max_tokens:
            break
        encoded.append(ids)
    lengths = np.array([min(len(ids) + 1, max_len) for ids in encoded], dtype=np.int64)
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.empty(offsets[-1], dtype=np.int32)
    n_truncated = 0
    for i, ids in enumerate(encoded):
        start, end = offsets[i], offsets[i + 1]
        tokens[start] = bos_token_id
        tokens[start + 1 : end] = ids[: end - start - 1]
        n_truncated += len(ids) + 1 > max_len
    return TokenizedSplit(tokens=tokens, doc_offsets=offsets, n_truncated=n_truncated)


def encode(documents: list[str], tokenizer, offsets: bool = False) -> Iterator[tuple[list[int], list | None]]:
    """Each document's token ids (and, with `offsets`, each token's character span), a slice at a time."""
    for first in range(0, len(documents), TOKENIZE_DOCUMENTS):
        wanted = {"return_offsets_mapping": True} if offsets else {}  # extraction's call: the tokenizer's default
        found = tokenizer(documents[first : first + TOKENIZE_DOCUMENTS], add_special_tokens=False, **wanted)
        ids = found["input_ids"]
        yield from zip(ids, found["offset_mapping"] if offsets else [None] * len(ids), strict=True)


def load_tokenizer(cfg: ModelConfig):
    """The model's tokenizer alone (what the bridge tokenizes with), for work that needs no weights: no
    TransformerLens, no checkpoint."""
    import transformers

    if looks_local(cfg.name) and not Path(cfg.name).expanduser().is_dir():
        raise PipelineError(f"model.name directory {cfg.name} does not exist")
    try:
        return transformers.AutoTokenizer.from_pretrained(cfg.name, revision=cfg.revision)
    except Exception as exc:  # hub, filesystem and config errors all mean "could not get this tokenizer"
        raise PipelineError(
            f"the tokenizer of {cfg.name!r} could not be loaded: {type(exc).__name__}: {first_line(exc)}. "
            "Offline? Point model.name at a local directory holding an HF checkpoint and its tokenizer"
        ) from exc


@dataclass
class Batch:
    """Documents padded on the right into one [len(docs), width] forward pass."""

    docs: np.ndarray  # document indices
    width: int


def plan_batches(lengths: np.ndarray, doc_ids: np.ndarray, batch_tokens: int) -> list[Batch]:
    """Group documents of similar length so that padding stays small and no batch exceeds `batch_tokens`."""
    order = doc_ids[np.argsort(lengths[doc_ids], kind="stable")[::-1]]
    batches: list[Batch] = []
    current: list[int] = []
    width = 0
    for doc in order:
        length = int(lengths[doc])
        if current and max(width, length) * (len(current) + 1) > batch_tokens:
            batches.append(Batch(np.array(current), width))
            current, width = [], 0
        current.append(int(doc))
        width = max(width, length)
    if current:
        batches.append(Batch(np.array(current), width))
    return batches


def padded(batch: Batch, tokens: np.ndarray, offsets: np.ndarray, device: torch.device):
    """Token ids [n, width] (right-padded with 0) and the attention mask for `batch`, on `device`."""
    lengths = offsets[batch.docs + 1] - offsets[batch.docs]
    ids = np.zeros((len(batch.docs), batch.width), dtype=np.int64)
    for row, doc in enumerate(batch.docs):
        ids[row, : lengths[row]] = tokens[offsets[doc] : offsets[doc + 1]]
    mask = (np.arange(batch.width) < lengths[:, None]).astype(np.int64)
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
