"""Tasks: synthetic generator, local files, cleaning, splits, nested subsets, tokenisation."""

from __future__ import annotations

import functools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lensray.engine.data import (
    TaskConfig,
    clean_rows,
    collate,
    encode,
    load_task,
    synthetic_rows,
    synthetic_rule,
)
from lensray.errors import LensrayInputError
from lensray.engine.models import char_tokenizer

SMALL = dict(synthetic_rows=600, test_size=64, validation_size=16)


@functools.lru_cache(maxsize=1)
def _small_task():
    return load_task(TaskConfig(**SMALL))


def test_synthetic_rows_are_deterministic_and_follow_the_rule():
    rows = synthetic_rows(200, seed=3)
    assert rows == synthetic_rows(200, seed=3)
    assert rows != synthetic_rows(200, seed=4)
    rule = synthetic_rule(3)
    alphabet = "abcdefghijklmnop"
    hits = total = 0
    for row in rows:
        assert row["input"].endswith("=") and len(row["target"]) == 8
        seq = [alphabet.index(c) for c in row["input"][:-1] + row["target"].lower()]
        n_in = len(row["input"]) - 1
        for i in range(n_in, len(seq)):
            hits += int(rule[seq[i - 2], seq[i - 1]] == seq[i])
            total += 1
    assert 0.85 < hits / total < 0.97  # each symbol follows the table except with 10% noise


def test_splits_are_fixed_and_disjoint():
    a, b = load_task(TaskConfig(**SMALL)), load_task(TaskConfig(**SMALL))
    assert [e.prompt for e in a.test] == [e.prompt for e in b.test]
    assert len(a.test) == 64 and len(a.validation) == 16 and len(a.train) == 600 - 80
    ids = lambda xs: {id(x) for x in xs}  # noqa: E731
    assert not ids(a.train) & ids(a.test) and not ids(a.train) & ids(a.validation)
    other = load_task(TaskConfig(**SMALL, split_seed=99))
    assert [e.prompt for e in other.test] != [e.prompt for e in a.test]


def test_fractional_test_size():
    data = load_task(TaskConfig(synthetic_rows=400, test_size=0.25, validation_size=0))
    assert len(data.test) == 100 and len(data.train) == 300


def test_subsets_are_nested_and_deterministic():
    data = load_task(TaskConfig(**SMALL))
    s50, s100, s400 = (data.subset(n, seed=7) for n in (50, 100, 400))
    assert s100[:50] == s50 and s400[:100] == s100
    assert data.subset(100, seed=7) == s100
    assert data.subset(100, seed=8) != s100
    assert data.subset(0) == []
    test_ids = {id(e) for e in data.test + data.validation}
    assert not any(id(e) in test_ids for e in s400)


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(0, 520), min_size=2, max_size=5), seed=st.integers(0, 10**6))
def test_subsets_nest_for_any_sizes(sizes, seed):
    data = _small_task()
    subsets = [data.subset(n, seed) for n in sorted(sizes)]
    for small, large in zip(subsets, subsets[1:]):
        assert large[: len(small)] == small


def test_max_rows_takes_a_seeded_sample(tmp_path):
    path = _write_rows(tmp_path, [{"input": f"in{i}", "target": f"out{i}"} for i in range(100)], "jsonl")
    task = TaskConfig(source=str(path), max_rows=40, test_size=4, validation_size=0)
    a, b = load_task(task), load_task(task)
    assert a.n_rows == 40 and [e.prompt for e in a.train] == [e.prompt for e in b.train]
    assert {e.prompt for e in a.train} != {f"in{i}" for i in range(36)}  # a sample, not the first rows


def test_subset_larger_than_train_split_names_both_numbers():
    data = load_task(TaskConfig(**SMALL))
    with pytest.raises(LensrayInputError, match=r"subset size 5000 .* train split \(520 rows\)"):
        data.subset(5000)


def _write_rows(tmp_path, rows, fmt):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    path = tmp_path / f"rows.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif fmt == "csv":
        pacsv.write_csv(pa.Table.from_pylist(rows), path)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_local_files_with_column_mapping_and_template(tmp_path, fmt):
    rows = [{"question": f"q{i}", "answer": f"a{i}", "extra": i} for i in range(40)]
    path = _write_rows(tmp_path, rows, fmt)
    task = TaskConfig(source=str(path), input_column="question", target_column="answer",
                      template="Q: {question}\nA:", test_size=8, validation_size=4)
    data = load_task(task)
    assert data.n_rows == 40 and len(data.train) == 28 and data.bad_rows == {}
    ex = data.train[0]
    assert ex.prompt.startswith("Q: q") and ex.prompt.endswith("\nA:") and ex.target.startswith("a")
    assert ex.prompt[4:-3] == ex.target[1:]


def test_text_column_language_modelling(tmp_path):
    path = _write_rows(tmp_path, [{"text": f"sentence number {i}"} for i in range(30)], "jsonl")
    data = load_task(TaskConfig(source=str(path), text_column="text", test_size=5, validation_size=0))
    assert all(e.prompt == "" and e.target.startswith("sentence") for e in data.train)


def test_folder_source_and_missing_file(tmp_path):
    full, empty = tmp_path / "full", tmp_path / "empty"
    full.mkdir()
    empty.mkdir()
    _write_rows(full, [{"input": "x", "target": "y"}] * 20, "jsonl")
    assert load_task(TaskConfig(source=str(full), test_size=4, validation_size=0)).n_rows == 20
    with pytest.raises(LensrayInputError, match="does not exist"):
        load_task(TaskConfig(source=str(tmp_path / "nope.jsonl")))
    with pytest.raises(LensrayInputError, match="holds no"):
        load_task(TaskConfig(source=str(empty)))


def test_bad_rows_are_counted_and_the_run_goes_on(tmp_path):
    rows = [{"input": f"in{i}", "target": f"out{i}"} for i in range(40)]
    rows[0] = {"input": "x"}                       # missing target
    rows[1] = {"input": "x", "target": "   "}      # empty target
    rows[2] = {"input": ["a", "list"], "target": "t"}  # non-text input
    rows[3] = {"input": None, "target": "t"}       # missing input
    rows[4] = {"input": 42, "target": "t"}         # numbers become text
    path = _write_rows(tmp_path, rows, "jsonl")
    data = load_task(TaskConfig(source=str(path), test_size=5, validation_size=0))
    assert data.bad_rows == {"missing 'target'": 1, "empty 'target'": 1, "non-text 'input'": 1,
                             "missing 'input'": 1}
    assert len(data.train) + len(data.test) == 36
    assert "unusable rows" in data.summary() and "empty 'target': 1" in data.summary()


def test_too_many_bad_rows_is_an_error_naming_the_column(tmp_path):
    rows = [{"input": f"in{i}", "target": "" if i % 3 else "ok"} for i in range(30)]
    path = _write_rows(tmp_path, rows, "jsonl")
    with pytest.raises(LensrayInputError, match="empty 'target'"):
        load_task(TaskConfig(source=str(path), test_size=2, validation_size=0))


def test_too_few_rows_and_bad_template_are_input_errors(tmp_path):
    path = _write_rows(tmp_path, [{"input": "x", "target": "y"}] * 10, "jsonl")
    with pytest.raises(LensrayInputError, match="10 usable rows, fewer than test_size 256"):
        load_task(TaskConfig(source=str(path)))
    with pytest.raises(ValueError, match="template"):  # refused when the config is read
        TaskConfig(source=str(path), template="{input", test_size=2)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(LensrayInputError, match="no rows|could not be loaded"):
        load_task(TaskConfig(source=str(tmp_path / "empty.jsonl")))


def test_missing_column_is_an_error_naming_it(tmp_path):
    path = _write_rows(tmp_path, [{"prompt": "p", "target": "t"}] * 10, "jsonl")
    with pytest.raises(LensrayInputError, match="column 'input' not found.*prompt"):
        load_task(TaskConfig(source=str(path), test_size=2))
    with pytest.raises(LensrayInputError, match="column 'question' not found"):
        load_task(TaskConfig(source=str(path), template="{question}", test_size=2))


def test_unknown_hub_dataset_is_an_input_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(LensrayInputError, match="could not be loaded"):
        load_task(TaskConfig(source="no-such-org/no-such-dataset"))


def test_task_config_rejects_unknown_fields():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        TaskConfig(sorce="synthetic")


def test_causal_encoding_masks_prompt_and_truncates():
    tok = char_tokenizer()
    examples, _ = clean_rows(TaskConfig(), [{"input": "abc=", "target": "XY"}])
    (enc,) = encode(examples, tok, "causal", max_length=64)
    assert tok.decode(enc.input_ids) == "abc=XY" + tok.eos_token
    assert enc.labels[:4] == [-100] * 4 and enc.labels[4:] == enc.input_ids[4:]
    (short,) = encode(examples, tok, "causal", max_length=5)
    assert tok.decode(short.input_ids) == "c=XY" + tok.eos_token  # the prompt loses its start first
    assert short.labels == [-100, -100] + short.input_ids[2:]
    long, _ = clean_rows(TaskConfig(), [{"input": "p" * 50, "target": "T" * 50}])
    (trunc,) = encode(long, tok, "causal", max_length=20)
    assert len(trunc.input_ids) == 20 and sum(x != -100 for x in trunc.labels) == 10  # half kept for the target


def test_seq2seq_encoding_and_collate_pad_labels():
    tok = char_tokenizer()
    examples, _ = clean_rows(TaskConfig(), [{"input": "abc=", "target": "XY"}, {"input": "a=", "target": "XYZW"}])
    enc = encode(examples, tok, "seq2seq", max_length=64)
    assert enc[0].decoder_labels == tok("XY", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    batch = collate(enc, tok.pad_token_id, "seq2seq")
    assert batch["input_ids"].shape == (2, 4) and batch["labels"].shape == (2, 5)
    assert batch["labels"][0, 3:].tolist() == [-100, -100]
    assert batch["attention_mask"][1].tolist() == [1, 1, 0, 0]
