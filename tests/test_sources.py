"""Any corpus in: local jsonl, json, parquet and txt files, a held-out split, a token cap, errors that name the row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow
import pyarrow.parquet
import pytest
import yaml
from conftest import PROJECT_ROOT, invoke, readme_command

from pipeline.corpus import load_documents, tokenize
from pipeline.params import DataConfig
from pipeline.sources import read_split
from pipeline.store import ActivationStore
from pipeline.store.format import differing
from pipeline.tiny import make_rows


def texts(n: int, seed: int = 5) -> list[dict]:
    return [{"text": f"{row['question']}\n{row['answer']}", "id": i} for i, row in enumerate(make_rows(n, seed))]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def corpus(directory: Path, **data) -> DataConfig:
    return DataConfig(dataset=str(directory), template="{text}", **data)


def test_a_held_out_split_is_a_seeded_choice_of_whole_documents(tmp_path):
    rows = texts(50)
    write_jsonl(tmp_path / "corpus.jsonl", rows)  # one split, named after no split
    cfg = corpus(tmp_path, test_fraction=0.2, split_seed=3)
    train, test = (read_split(cfg, split) for split in ("train", "test"))
    assert len(test.rows) == 10 and len(train.rows) == 40
    assert sorted(r["id"] for r in train.rows + test.rows) == list(range(50))  # disjoint, nothing lost
    assert [r["id"] for r in test.rows] == sorted(r["id"] for r in test.rows)  # corpus order kept
    assert read_split(cfg, "test").rows == test.rows  # seeded
    other = read_split(corpus(tmp_path, test_fraction=0.2, split_seed=4), "test")
    assert other.rows != test.rows
    assert test.where[0].startswith(f"{tmp_path / 'corpus.jsonl'}:")


def test_every_format_and_file_pattern_reads_the_same_rows(tmp_path):
    rows = texts(12)
    write_jsonl(tmp_path / "jsonl/train.jsonl", rows)
    (tmp_path / "json").mkdir()
    (tmp_path / "json/train.json").write_text(json.dumps(rows))
    (tmp_path / "parquet").mkdir()  # several files of one split, as the hub's parquet exports name them
    for part, first in enumerate((0, 5)):
        table = pyarrow.Table.from_pylist(rows[first : first + 5] if first == 0 else rows[first:])
        pyarrow.parquet.write_table(table, tmp_path / f"parquet/train-0000{part}-of-00002.parquet")
    for i, row in enumerate(rows):
        (tmp_path / "txt/train").mkdir(parents=True, exist_ok=True)
        (tmp_path / f"txt/train/{i:03d}.txt").write_text(row["text"])
    expected = [row["text"] for row in rows]
    for kind in ("jsonl", "json", "parquet", "txt"):
        assert load_documents(corpus(tmp_path / kind), "train") == expected, kind


def test_max_tokens_keeps_the_leading_documents_that_fit(tmp_path):
    class Characters:  # one token per character
        def __call__(self, documents, add_special_tokens):
            return {"input_ids": [[ord(c) for c in doc] for doc in documents]}

    documents = ["abc", "de", "fghij", "k"]  # 4, 3, 6 and 2 tokens with BOS
    capped = tokenize(documents, Characters(), 0, max_len=100, max_tokens=8)
    assert capped.n_docs == 2 and capped.doc_offsets.tolist() == [0, 4, 7]
    whole = tokenize(documents, Characters(), 0, max_len=100)
    assert whole.n_docs == 4 and np.array_equal(whole.tokens[:7], capped.tokens)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"train.jsonl": '{"title": "no text"}\n'}, "train.jsonl:1: no field text, which data.template"),
        ({"train.jsonl": '{"text": null}\n'}, "train.jsonl:1: no field text"),
        ({"train.json": '{"text": "not in an array"}'}, "train.json: expected a JSON array of objects"),
        ({"train.json": '[{"text": "a"}, 7]'}, "train.json row 1: expected a JSON object"),
        ({"train.parquet": "not parquet"}, "train.parquet: not a readable parquet file"),
        ({"other.jsonl": '{"text": "a"}\n'}, "split 'train': no train.jsonl"),
    ],
)
def test_bad_rows_and_files_are_named(tmp_path, files, message):
    from pipeline.core.errors import PipelineError

    for name, content in files.items():
        (tmp_path / name).write_text(content)
    with pytest.raises(PipelineError, match=message.replace("(", r"\(")):
        load_documents(corpus(tmp_path), "train")


def test_the_default_dataset_s_store_identity_is_unchanged():
    """A store written before these settings existed is still up to date when they are left at their defaults."""
    before = {"dataset": "openai/gsm8k", "max_docs": None}
    now = {"dataset": "openai/gsm8k", "max_docs": None, "max_tokens": None, "held_out": None}
    assert differing(before, now) == []
    assert differing(before, now | {"max_tokens": 1000}) == ["max_tokens"]


def run_on(tmp_path: Path, tiny_model_dir: Path, data: dict, split_of: dict[str, str], command=("run",)) -> Path:
    """`command` (`pipeline run`) with the tiny profile on the tiny model as params.yaml, `data` updating its data
    section and the train, evaluate and analyze sections reading the splits `split_of` names."""
    params = yaml.safe_load((PROJECT_ROOT / "params-tiny.yaml").read_text())
    params["model"]["name"] = str(tiny_model_dir)
    params["data"] |= data
    params["extract"]["hooks"] = ["blocks.1.hook_resid_post"]
    params["train"]["hook"] = "blocks.1.hook_resid_post"
    params["sae"] = {key: params["sae"][key] | {"epochs": 1} for key in ("a", "c")}
    for section, split in split_of.items():
        params[section] = (params.get(section) or {}) | {"split": split}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        result = invoke(*command)
    assert result.exit_code == 0, result.output
    return tmp_path


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_a_local_corpus_runs_end_to_end(tmp_path, tiny_model_dir, kind):
    rows = texts(160)
    if kind == "jsonl":  # the README's command as written: one file, one split, the test split held out from it
        command = readme_command("pipeline run -S data.dataset=")
        write_jsonl(tmp_path / "my-corpus/books.jsonl", rows)
        data, split_of, expected = {}, {}, {"train": 152, "test": 8}
    else:  # parquet files per split, under split names of the corpus's own
        (tmp_path / "corpus").mkdir()
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows[:120]), tmp_path / "corpus/fit-00000.parquet")
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows[120:]), tmp_path / "corpus/heldout.parquet")
        data, command = {"dataset": "corpus", "template": "{text}", "splits": ["fit", "heldout"]}, ["run"]
        split_of, expected = {"train": "fit", "evaluate": "heldout", "analyze": "heldout"}, {"fit": 120, "heldout": 40}
    root = run_on(tmp_path, tiny_model_dir, data, split_of, command)
    stats = ActivationStore(root / "data/activations").attrs["split_stats"]
    assert {split: found["n_docs"] for split, found in stats.items()} == expected
    metrics = json.loads((root / "artifacts/metrics/eval_a.json").read_text())
    assert 0 < metrics["explained_variance"] <= 1
    assert (root / "artifacts/report.md").is_file() and (root / "artifacts/browser/config_a_4x/index.html").is_file()
