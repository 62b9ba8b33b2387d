"""Stage `label`: every token of the store's splits labelled from the solutions' own structure (pipeline/label),
into `probe.labels` beside the store. No model is run: the documents are rendered again, and the store's tokens
must be theirs (pipeline/label/spans.py), so that the labels line up with the activations."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.core.progress import progress_bars
from pipeline.corpus import TokenizedSplit, load_rendered, load_tokenizer
from pipeline.label.label_set import label_split, write_label_set
from pipeline.label.structure import OperationClasses
from pipeline.params import Params
from pipeline.store import ActivationStore

log = logging.getLogger(__name__)


def run(params: Params) -> Path:
    """Label every split of the store; returns the label set's directory."""
    store = ActivationStore(params.extract.store)
    path = Path(params.probe.labels)
    meta = {"store": store.path, "template": store.attrs.get("template"), "command": params.command}
    if store.is_synthetic:
        log.info("%s holds synthetic data: no text to label; %s records that", store.path, path)
        write_label_set(path, {}, OperationClasses(), meta | {"no_text": "a synthetic store has no documents"})
        return path
    tokenizer = load_tokenizer(params.model)
    documents = {split: load_rendered(params.data, split) for split in store.splits}
    operations, splits = OperationClasses(), {}
    with progress_bars({"label": sum(len(d) for d in documents.values())}, unit="doc") as bars:
        for split, rendered in documents.items():
            tokens = TokenizedSplit(store.tokens(split), store.doc_offsets(split), n_truncated=0)
            try:
                splits[split] = label_split(rendered, tokens, tokenizer, int(store.attrs["n_ctx"]), operations)
            except PipelineError as exc:
                raise PipelineError(f"split {split!r} of {store.path}: {exc}: re-extract, or set them back") from None
            bars["label"].advance(len(rendered))
    record = write_label_set(path, splits, operations, meta)
    for split, found in record["splits"].items():
        log.info("%s: %d documents, %d steps, %d annotations (%d malformed) labelled", split, found["n_docs"],
                 found["steps"], found["annotations"], found["malformed_annotations"])  # fmt: skip
    if record["absent"]:
        log.info("label tasks this corpus does not have: %s", ", ".join(record["absent"]))
    log.info("token labels written to %s", path)
    return path
