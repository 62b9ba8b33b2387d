"""Where each stored token lies in its document's text, as a span of characters, checked against the text.

With a byte-level BPE tokenizer (GPT-2's scheme, and Llama 3's, Qwen2's...), every token id is a fixed string of
bytes, so the stored tokens themselves say where they lie: their bytes, one after the other, must spell the
document's UTF-8 text (a prefix of it where the document was truncated), and their running byte count, mapped to
characters, is their span. Nothing is tokenized again. With any other tokenizer the documents are tokenized again
with the tokenizer's own character offsets (as extraction tokenized them), and the ids must be the stored ones.
Either way, tokens that are not the documents' (another corpus, template or tokenizer) are an error, and a token
that covers part of a character (byte-level BPE splits some) spans that whole character.
"""

from __future__ import annotations

from itertools import chain

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.corpus import TokenizedSplit, encode

MISMATCH = "the store's tokens are not these documents' (data, template or tokenizer changed since extraction)"


def token_spans(texts: list[str], codes: np.ndarray, tokens: TokenizedSplit, tokenizer, max_len: int) -> np.ndarray:
    """[n_tokens, 2] each token's character span in the concatenated `texts` (`codes`: their code points); the BOS
    token's span is empty. `max_len`: the longest a document's tokens may be (shorter ones are whole)."""
    table = byte_level_vocabulary(tokenizer)
    kept = np.diff(tokens.doc_offsets) - 1  # each document's tokens after its BOS
    if table is not None:
        spans = _from_bytes(texts, codes, tokens, kept, table, max_len)
    else:
        spans = _from_offsets(texts, tokens, kept, tokenizer, max_len)
    out = np.zeros((len(tokens.tokens), 2), dtype=np.int64)
    bos = np.zeros(len(out), dtype=bool)
    bos[tokens.doc_offsets[:-1]] = True
    out[~bos] = spans
    return out


def byte_level_vocabulary(tokenizer) -> list[bytes] | None:
    """Each token id's bytes, for a byte-level BPE tokenizer; None for any other."""
    import tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not isinstance(backend.decoder, tokenizers.decoders.ByteLevel):
        return None
    to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    try:
        return [bytes(to_byte[char] for char in piece) for piece in pieces]
    except (KeyError, TypeError):  # a token that is not byte-level text: tokenize again instead
        return None


def _from_bytes(texts: list[str], codes: np.ndarray, tokens: TokenizedSplit, kept: np.ndarray, table: list[bytes],
                max_len: int) -> np.ndarray:  # fmt: skip
    ids = np.delete(tokens.tokens, tokens.doc_offsets[:-1]).astype(np.int64)  # the kept tokens, BOS left out
    vocabulary = np.frombuffer(b"".join(table), dtype=np.uint8)
    sizes = np.array([len(piece) for piece in table], dtype=np.int64)
    lengths = sizes[ids]
    ends = np.cumsum(lengths)  # each token's end in the bytes the tokens spell
    spelled = vocabulary[np.repeat(np.cumsum(sizes)[ids] - lengths - (ends - lengths), lengths) + np.arange(ends[-1]
                         if len(ends) else 0)]  # fmt: skip
    doc_bytes = np.diff(np.concatenate([[0], ends])[np.concatenate([[0], np.cumsum(kept)])])
    text = np.frombuffer("".join(texts).encode(), dtype=np.uint8)
    doc_start = np.cumsum([0, *(len(t.encode()) for t in texts[:-1])])  # where each document's bytes start
    text_bytes = np.diff(np.append(doc_start, len(text)))
    whole = kept + 1 < max_len  # a document shorter than the context was not truncated: its tokens spell all of it
    offset = np.repeat(doc_start - (np.cumsum(doc_bytes) - doc_bytes), doc_bytes)  # spelled byte -> text byte
    differs = (doc_bytes > text_bytes) | (whole & (doc_bytes != text_bytes))
    if not differs.any():
        wrong = np.flatnonzero(spelled != text[np.arange(len(spelled)) + offset])
        differs[np.searchsorted(np.cumsum(doc_bytes), wrong, side="right")] = True
    if differs.any():
        raise PipelineError(f"{MISMATCH}: document {int(np.argmax(differs))} differs")
    # Which character each byte of the text belongs to, and so each token's characters.
    width = np.where(codes < 0x80, 1, np.where(codes < 0x800, 2, np.where(codes < 0x10000, 3, 4)))
    character = np.repeat(np.arange(len(codes)), width)
    shift = np.repeat(doc_start - (np.cumsum(doc_bytes) - doc_bytes), kept)  # a token's spelled -> text position
    start, end = ends - lengths + shift, ends + shift
    nonempty = end > start
    return np.stack([character[start], np.where(nonempty, character[np.maximum(end - 1, 0)] + 1, 0)], axis=1)


def _from_offsets(texts: list[str], tokens: TokenizedSplit, kept: np.ndarray, tokenizer, max_len: int) -> np.ndarray:
    encoded = list(encode(texts, tokenizer, offsets=True))
    for doc, (ids, _) in enumerate(encoded):
        stored = tokens.tokens[tokens.doc_offsets[doc] + 1 : tokens.doc_offsets[doc + 1]]
        whole = kept[doc] + 1 < max_len  # a document shorter than the context was not truncated
        if list(ids[: kept[doc]]) != stored.tolist() or (whole and len(ids) != kept[doc]):
            raise PipelineError(f"{MISMATCH}: document {doc} differs")
    offsets = [offsets[: kept[doc]] for doc, (_, offsets) in enumerate(encoded)]
    flat = np.fromiter(chain.from_iterable(chain.from_iterable(offsets)), dtype=np.int64, count=2 * int(kept.sum()))
    starts = np.cumsum([0, *map(len, texts[:-1])])
    return flat.reshape(-1, 2) + np.repeat(starts, kept)[:, None]
