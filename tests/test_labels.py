"""Token labels from the solutions' structure: exact on hand-checked GSM8K rows, complete on the real test split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import invoke

from pipeline.core.errors import PipelineError
from pipeline.corpus import Document, TokenizedSplit, load_rendered, tokenize
from pipeline.label.label_set import LabelSet, final_classes, label_split, write_label_set
from pipeline.label.spans import token_spans
from pipeline.label.structure import OperationClasses
from pipeline.params import DataConfig
from pipeline.tiny import gpt2_tokenizer, write_jsonl

GPT2_BOS = 50256


@pytest.fixture(scope="module")
def tokenizer(real_data):
    return gpt2_tokenizer(real_data / "gpt2-tokenizer" / "gpt2.tiktoken")


def real_rows(real_data: Path, split: str, indices: list[int]) -> list[dict]:
    lines = (real_data / "gsm8k" / f"{split}.jsonl").read_text().splitlines()
    return [json.loads(lines[i]) for i in indices]


def labelled_tokens(tmp_path: Path, tokenizer, rows: list[dict], template: str = "{question}\n{answer}"):
    """Per document, its tokens as (text, {task: class name or None}), and the split's labels."""
    write_jsonl(tmp_path / "rows" / "test.jsonl", rows)
    documents = load_rendered(DataConfig(dataset=str(tmp_path / "rows"), template=template), "test")
    operations = OperationClasses()
    split = label_split(documents, stored_tokens(documents, tokenizer), tokenizer, 1024, operations)
    classes = final_classes({"test": split}, operations)
    out = []
    for doc, document in enumerate(documents):
        first, last = split.tokens.doc_offsets[doc], split.tokens.doc_offsets[doc + 1]
        ids = split.tokens.tokens[first + 1 : last].tolist()
        texts = [tokenizer.decode([i]) for i in ids]
        out.append([
            (text, {task: (classes[task][v] if (v := int(split.labels[task][first + 1 + j])) >= 0 else None)
                    for task in split.labels})
            for j, text in enumerate(texts)
        ])  # fmt: skip
        assert "".join(texts).replace("\ufffd", "") in document.text.replace("’", "")  # the tokens are the text's
    return out, split


def stored_tokens(documents, tokenizer) -> TokenizedSplit:
    """The tokens extraction stores for `documents` (GPT-2's context: 1,024)."""
    return tokenize([d.text for d in documents], tokenizer, GPT2_BOS, 1024)


def find(tokens: list, text: str, after: int = 0) -> int:
    """The index of the first token spelled `text` at or after token `after`."""
    return next(i for i in range(after, len(tokens)) if tokens[i][0] == text)


def test_a_test_row_is_labelled_as_checked_by_hand(tmp_path, real_data, tokenizer):
    """Test row 0: 'Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\\nShe makes 9 * 2 = $<<9*2=18>>18 every
    day at the farmer’s market.\\n#### 18'; the question has 16 and $2 (three and four are words)."""
    (tokens,), split = labelled_tokens(tmp_path, tokenizer, real_rows(real_data, "test", [0]))
    label = lambda i: tokens[i][1]  # noqa: E731
    assert label(find(tokens, "Jan"))["region"] == "question" and label(find(tokens, "Jan"))["step"] is None
    solution = find(tokens, "\n")  # the template's newline: the question has none
    assert tokens[solution][1]["region"] is None
    sells = find(tokens, " sells", solution)
    assert label(sells) | {} == {"region": "reasoning", "step": "1", "operation": None, "role": None,
                                 "number": "other", "number_source": None}  # fmt: skip
    assert [label(i)["number_source"] for i in range(sells + 1, sells + 6, 2)] == ["question", "new", "new"]  # 16 3 4
    opening = find(tokens, " <<")
    inside = tokens[opening : find(tokens, ">>", opening) + 1]
    assert [t for t, _ in inside] == [" <<", "16", "-", "3", "-", "4", "=", "9", ">>"]
    assert [lab["role"] for _, lab in inside] == [None, "operand", "operator", "operand", "operator", "operand",
                                                  "equals", "result", None]  # fmt: skip
    assert {lab["region"] for _, lab in inside} == {"annotation"} and {lab["operation"] for _, lab in inside} == {"-"}
    assert [lab["number_source"] for _, lab in inside if lab["number"] == "number"] == ["question", "new", "new", None]
    after = find(tokens, ">>", opening) + 1
    assert tokens[after][0] == "9" and label(after)["number_source"] == "computed"  # the result just computed
    line2 = find(tokens, "She")
    assert label(line2)["step"] == "2"
    assert label(find(tokens, " 9", line2))["number_source"] == "computed"  # step 1's result
    assert label(find(tokens, " 2", line2))["number_source"] == "question"  # $2 in the question
    assert label(find(tokens, " *", line2)) | {} == {**label(line2), "number": "other"}  # outside <<...>>: text
    second = find(tokens, "<<", line2)
    assert {tokens[i][1]["operation"] for i in range(second, second + 7)} == {"*"}
    final = find(tokens, "####")
    assert label(final)["region"] == "final_answer" and label(final)["step"] is None
    assert label(final + 1)["region"] == "final_answer" and label(final + 1)["number_source"] == "computed"
    assert split.documents["n_steps"].tolist() == [2] and split.documents["n_annotations"].tolist() == [2]
    assert split.documents["operations"].tolist() == [0b0110]  # - and *
    assert all(lab["region"] is None for text, lab in tokens if not text.strip())  # whitespace carries no label


def test_decimals_commas_and_dollars_in_train_and_test_rows(tmp_path, real_data, tokenizer):
    """Train 535: 'Eggs cost $.50 each' ... '36*.5=$<<36*.5=18>>18'; train 6090: '<<36*300=10800>>10,800';
    test 380: 'borrowed $3,650' ... '<<3650*0.1=365>>'."""
    rows = real_rows(real_data, "train", [535, 6090]) + real_rows(real_data, "test", [380])
    (eggs, gym, loan), _ = labelled_tokens(tmp_path, tokenizer, rows)
    # An annotation split across tokens: ".5" is "*." + "5", whose characters carry two roles.
    opening = find(eggs, "<<", find(eggs, "So"))
    inside = eggs[opening : find(eggs, ">>", opening) + 1]
    assert [t for t, _ in inside] == ["<<", "36", "*.", "5", "=", "18", ">>"]
    assert [lab["role"] for _, lab in inside] == [None, "operand", None, "operand", "equals", "result", None]
    assert inside[2][1]["region"] == "annotation" and inside[2][1]["number"] is None  # mixed: * other, . number
    assert inside[3][1]["number_source"] == "question"  # .5 is the question's $.50
    assert inside[1][1]["number_source"] == "computed"  # 36 = 3*12, computed in step 1
    # 10,800 after the annotation is the value it computed; 300 is the question's.
    assert gym[find(gym, "10", find(gym, ">>", find(gym, "So")))][1]["number_source"] == "computed"
    assert gym[find(gym, "300", find(gym, "\n"))][1]["number_source"] == "question"
    # $3,650 in the question; 3650 in the annotation is the same value.
    operand = find(loan, "<<") + 1
    assert "".join(t for t, _ in loan[operand : operand + 2]) == "3650"
    assert loan[operand][1]["number_source"] == "question" and loan[operand][1]["role"] == "operand"
    assert loan[find(loan, "0", operand)][1]["number_source"] == "new"  # 0.1: the question says 10%


def test_malformed_annotations_are_counted_and_get_no_roles(tmp_path, real_data, tokenizer):
    """Test 319 holds '<<3/4=3/4>>' (a fraction as result); train 394 '<<560//10=56>>'."""
    rows = real_rows(real_data, "test", [319]) + real_rows(real_data, "train", [394])
    documents, split = labelled_tokens(tmp_path, tokenizer, rows)
    assert split.documents["n_malformed"].tolist() == [1, 1]
    for tokens, written in zip(documents, ("3/4=3/4", "560//10=56"), strict=True):
        annotations, current = [], []  # runs of tokens in region annotation
        for text, lab in tokens:
            if lab["region"] == "annotation":
                current.append((text, lab))
            elif current:
                annotations, current = [*annotations, current], []
        (malformed,) = [run for run in annotations if all(lab["role"] is None for _, lab in run)]
        assert "".join(text for text, _ in malformed).strip() == f"<<{written}>>"
        assert {lab["operation"] for _, lab in malformed} == {None}
        assert {lab["number_source"] for _, lab in malformed} == {None}  # its numbers have no source


def test_a_plain_text_corpus_gets_only_the_number_task(tmp_path, tokenizer):
    rows = [{"text": "In 2023 the 3 cats ate <<2*3=6>> fish.\n#### 6"}]
    (tokens,), split = labelled_tokens(tmp_path, tokenizer, rows, template="{text}")
    assert {task for task, values in split.labels.items() if (values >= 0).any()} == {"number"}
    numbers = [text for text, lab in tokens if lab["number"] == "number"]
    assert numbers == [" 20", "23", " 3", "2", "3", "6", " 6"]


def test_every_real_test_document_is_labelled(tmp_path, real_data, tokenizer):
    """The whole real test split: every solution has steps and a final answer; counts reported in the note."""
    documents = load_rendered(DataConfig(dataset=str(real_data / "gsm8k")), "test")
    operations = OperationClasses()
    tokens = stored_tokens(documents, tokenizer)
    split = label_split(documents, tokens, tokenizer, 1024, operations)
    record = write_label_set(tmp_path / "labels", {"test": split}, operations, {})["splits"]["test"]
    assert record["n_docs"] == len(documents) == 1319 and record["documents_with_solution"] == 1319
    assert (split.documents["n_steps"] >= 1).all()
    regions = split.labels["region"]
    for doc in range(split.tokens.n_docs):  # every document has each region, the final answer last
        found = regions[split.tokens.doc_offsets[doc] : split.tokens.doc_offsets[doc + 1]]
        assert {0, 1, 3} <= set(found.tolist()), doc
        assert found[found >= 0][-1] == 3
    assert record["annotations"] == 4282 and record["malformed_annotations"] == 1 and record["steps"] == 4819
    assert record["mixed_tokens"]["region"] == 0 and record["mixed_tokens"]["step"] == 0
    labels = LabelSet(tmp_path / "labels")
    assert np.array_equal(labels.tokens("test")["role"], split.labels["role"])
    # The spans from the tokens' own bytes are the tokenizer's character offsets, token for token.
    texts = [d.text for d in documents]
    codes = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
    with_bytes = token_spans(texts, codes, tokens, tokenizer, 1024)
    without = token_spans(texts, codes, tokens, OffsetsOnly(tokenizer), 1024)
    assert np.array_equal(with_bytes, without)


class OffsetsOnly:
    """The same tokenizer, seen as one that is not byte-level: spans come from its character offsets."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)


def test_tokens_that_do_not_spell_the_documents_are_refused(tmp_path, real_data, tokenizer):
    documents = load_rendered(DataConfig(dataset=str(real_data / "gsm8k"), max_docs=20), "test")
    tokens = stored_tokens(documents, tokenizer)
    for change in (lambda text: text + " more", lambda text: text.replace(" ", "  ", 1)):  # longer; same length
        changed = [Document(change(d.text), d.fields) if i == 7 else d for i, d in enumerate(documents)]
        for view in (tokenizer, OffsetsOnly(tokenizer)):
            with pytest.raises(PipelineError, match=r"the store's tokens are not these documents'.*document 7 differs"):
                label_split(changed, tokens, view, 1024, OperationClasses())


def test_label_stage_refuses_a_store_whose_tokens_differ(tmp_path, tiny_params):
    assert invoke("extract", "--params", str(tiny_params)).exit_code == 0
    result = invoke("label", "--params", str(tiny_params), "-S", f"probe.labels={tmp_path / 'labels'}")
    assert result.exit_code == 0, result.output
    changed = invoke("label", "--params", str(tiny_params), "-S", f"probe.labels={tmp_path / 'labels'}",
                     "-S", "data.template={question}  {answer}")  # fmt: skip
    assert changed.exit_code == 2 and "split 'train' of" in changed.stderr
    assert "the store's tokens are not these documents'" in changed.stderr
