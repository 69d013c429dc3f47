"""Screening config: defaults, overrides, and every validation error as one line naming the field."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from lensray.run.config import (
    DEFAULT_CONFIG, GridConfig, ScreenConfig, check_train_size, load_config, parse_set,
)
from lensray.errors import LensrayInputError

REPO = Path(__file__).resolve().parents[2]
ZOO = [{"id": "a", "model": "tiny:gpt2"}, {"id": "b", "model": "tiny:llama"}]


def _cfg(**extra) -> dict:
    return {"zoo": [dict(c) for c in ZOO], **extra}


def test_defaults_and_grid_sizes():
    config = load_config(_cfg())
    assert isinstance(config, ScreenConfig)
    assert config.grid_sizes() == [0, 200, 400, 800, 1600, 3200]
    assert config.target_samples == 1_638_400
    assert config.predictor.method == "lensray" and config.pruning.grace_points == 3
    assert config.candidate("b").source == "tiny:llama"
    assert load_config({"zoo": [{"id": "org/m"}]}).zoo[0].source == "org/m"


def test_grid_without_zero_shot_and_non_integer_factor():
    assert GridConfig(start=100, factor=1.5, max_samples=500, zero_shot=False).sizes() == [100, 150, 225, 338]
    assert GridConfig(start=1, factor=1.01, max_samples=5).sizes() == [0, 1, 2, 3, 4, 5]


def test_overrides_set_dotted_keys_and_list_entries():
    config = load_config(_cfg(ray={"address": "auto"}), overrides={
        "storage.path": "out/x", "ray.address": None, "grid.max_samples": 1600, "zoo[1].gpus": 0.5,
        "pruning.top_k": 3})
    assert config.storage.path == "out/x" and config.ray.address is None and config.grid.max_samples == 1600
    assert config.zoo[1].gpus == 0.5 and config.zoo[0].gpus == 0 and config.pruning.top_k == 3


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("grid.max_sampels", 800, "grid.max_sampels: unknown key; did you mean 'max_samples'?"),
        ("zoo[5].gpus", 1, "zoo[5].gpus: zoo has no entry 5"),
        ("name.first", "x", "name: must be a mapping of settings, got str 'n' (so name.first cannot be set)"),
        ("grid..start", 1, "grid..start: not a config key"),
        ("grid.max_samples", "lots", "grid.max_samples: Input should be a valid integer"),
    ],
)
def test_a_bad_override_is_one_line_naming_the_key(key, value, words):
    with pytest.raises(LensrayInputError) as info:
        load_config(_cfg(name="n"), overrides={key: value})
    assert str(info.value).startswith(words) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "text, pair",
    [
        ("grid.max_samples=800", ("grid.max_samples", 800)),
        ("ray.address=null", ("ray.address", None)),
        ("storage.path=s3://bucket/run=1", ("storage.path", "s3://bucket/run=1")),
        ("pruning.enabled=false", ("pruning.enabled", False)),
        ("zoo=[{id: a}, {id: b}]", ("zoo", [{"id": "a"}, {"id": "b"}])),
    ],
)
def test_parse_set_reads_the_value_as_yaml(text, pair):
    assert parse_set(text) == pair


@pytest.mark.parametrize("text", ["grid.max_samples", "=3", "name=[unclosed"])
def test_parse_set_refuses_what_is_not_key_value(text):
    with pytest.raises(LensrayInputError, match=r"^--set "):
        parse_set(text)


def test_resolved_yaml_round_trips():
    config = load_config(_cfg(name="rt"))
    again = load_config(yaml.safe_load(config.to_yaml()))
    assert again == config


def test_every_field_is_documented():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            sub = field.annotation
            for arg in getattr(sub, "__args__", (sub,)):
                if isinstance(arg, type) and hasattr(arg, "model_fields") and arg.__module__ == "lensray.run.config":
                    walk(arg)

    walk(ScreenConfig)


@pytest.mark.parametrize(
    "data, field, words",
    [
        (_cfg(zooo=[]), "zooo", "did you mean 'zoo'"),
        ({"zoo": [{"id": "a", "gpu": 1}]}, "zoo[0].gpu", "did you mean 'gpus'"),
        (_cfg(grid={"max_sample": 10}), "grid.max_sample", "did you mean 'max_samples'"),
        (_cfg(task={"sorce": "synthetic"}), "task.sorce", "did you mean 'source'"),
        (_cfg(probe={"zzzz_unrelated": 1}), "probe.zzzz_unrelated", "unknown key"),
        ({"zoo": [{"id": "a", "gpus": "two"}]}, "zoo[0].gpus", "number"),
        (_cfg(target_samples="many"), "target_samples", "integer"),
        (_cfg(grid={"start": -5}), "grid.start", "greater than"),
        (_cfg(grid={"factor": 1.0}), "grid.factor", "greater than 1"),
        (_cfg(grid={"factor": "inf"}), "grid.factor", "finite"),
        (_cfg(pruning={"grace_points": 2}), "pruning.grace_points", "greater than or equal to 3"),
        (_cfg(predictor={"method": "oracle"}), "predictor.method", "lensray"),
        (_cfg(predictor={"level": 1.5}), "predictor.level", "less than 1"),
        ({"zoo": [{"id": "a", "strategy": "zero3"}]}, "zoo[0].strategy", "ddp"),
        ({"zoo": [{"id": "a", "workers": 2, "strategy": "fsdp"}], "probe": {"ntk": True}}, "zoo[0].strategy", "NTK"),
        (_cfg(pruning={"scout": "sometimes"}), "pruning.scout", "bool"),
        ({"zoo": "gpt2"}, "zoo", "list"),
        (_cfg(ray="local"), "ray", "dictionary"),
        (_cfg(target_samples=3200), "grid.max_samples", "smaller than target_samples"),
        (_cfg(target_samples=1000), "grid.max_samples", "smaller than target_samples"),
        (_cfg(grid={"start": 200, "max_samples": 400}), "grid", "at least 3"),
        (_cfg(grid={"start": 2000, "max_samples": 3200, "zero_shot": True}), "grid", "at least 3"),
        ({"zoo": []}, "zoo", "empty"),
        ({}, "zoo", "empty"),
        ({"zoo": [{"id": "a"}, {"id": "b"}, {"id": "a"}]}, "zoo[2].id", "duplicate"),
        ({"zoo": [{"model": "gpt2"}]}, "zoo[0].id", "required"),
        ({"zoo": [{"id": ""}]}, "zoo[0].id", "at least 1"),
    ],
)
def test_invalid_config_is_one_line_naming_the_field(data, field, words):
    with pytest.raises(LensrayInputError) as info:
        load_config(data)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{field}: "), msg
    assert words in msg, msg


def test_missing_file(tmp_path):
    with pytest.raises(LensrayInputError, match=r"^config: file not found: .*nope\.yaml$"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "text, words",
    [
        ("zoo: [\n  - id: a\n", "YAML syntax error"),
        ("name: x\n  bad indent: 1\n", "line 2"),
        ("- a\n- b\n", "must hold a mapping"),
    ],
)
def test_bad_yaml_files(tmp_path, text, words):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(LensrayInputError) as info:
        load_config(path)
    assert str(info.value).startswith("config: ") and "\n" not in str(info.value)
    assert words in str(info.value)


def test_yaml_is_never_evaluated(tmp_path):
    path = tmp_path / "evil.yaml"
    marker = tmp_path / "pwned"
    path.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\nzoo: [{{id: a}}]\n")
    with pytest.raises(LensrayInputError, match=r"^config: YAML tag not allowed .* line 1"):
        load_config(path)
    assert not marker.exists()


def test_trust_remote_code_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="lensray.run.config"):
        load_config({"zoo": [{"id": "safe"}, {"id": "risky", "trust_remote_code": True}]})
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "risky" in lines[0] and "trust_remote_code" in lines[0]


def test_shipped_configs_load():
    demo = load_config(DEFAULT_CONFIG)
    assert demo.target_samples > demo.grid.max_samples
    assert 4 <= len(demo.zoo) <= 6
    assert all(c.gpus == 0 for c in demo.zoo)
    assert len({c.source.split(":")[1] for c in demo.zoo}) >= 4, "demo zoo should span model families"
    assert load_config(None) == demo
    flan = load_config(REPO / "configs" / "flan-zoo.yaml")
    assert len(flan.zoo) == 30 and all(c.gpus >= 1 for c in flan.zoo)
    assert flan.target_samples == 1_638_400
    example = load_config(REPO / "configs" / "example-jsonl.yaml")
    assert example.candidate("my-checkpoint").source == "./checkpoints/my-model"
    assert sorted(p.name for p in (REPO / "configs").glob("*.yaml")) == ["demo.yaml", "example-jsonl.yaml", "flan-zoo.yaml", "gpu-check.yaml"]


def test_flan_zoo_matches_the_benchmark_table(benchmarks_dir):
    import csv

    with open(benchmarks_dir / "flan.csv", newline="") as fh:
        names = [row["config name"] for row in csv.DictReader(fh)]
    flan = load_config(REPO / "configs" / "flan-zoo.yaml")
    assert sorted(c.source for c in flan.zoo) == sorted(names)


CLI_CASES = [
    ("zoo: [{id: a, gpu: 1}]\n", "zoo[0].gpu: unknown key; did you mean 'gpus'?"),
    ("zoo: [{id: a, workers: many}]\n", "zoo[0].workers: "),
    ("zoo: [{id: a}]\ntarget_samples: 3200\n", "grid.max_samples: 3200 must be smaller than target_samples"),
    ("zoo: [{id: a}]\ngrid: {start: 1000, max_samples: 3200}\n", "grid: 2 subset size(s)"),
    ("zoo: []\n", "zoo: empty"),
    ("zoo: [{id: a}, {id: a}]\n", "zoo[1].id: duplicate candidate id 'a'"),
    ("zoo: [{id: a}\n", "config: YAML syntax error"),
    ("zoo: [{id: a}]\ntask: {max_lenght: 64}\n", "task.max_lenght: unknown key; did you mean 'max_length'?"),
    ("zoo: [{id: a}]\nprobe: {learning_rate: -1}\n", "probe.learning_rate: "),
]


@pytest.mark.parametrize("text, start", CLI_CASES)
def test_screen_cli_exits_2_with_one_line_before_ray(tmp_path, monkeypatch, capsys, text, start):
    import ray

    from lensray.cli.main import main

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for an invalid config")

    monkeypatch.setattr(ray, "init", no_ray)
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["screen", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {start}"), err
    assert not (tmp_path / "out").exists(), "nothing is written for an invalid config"


def test_screen_cli_missing_config_file(tmp_path, capsys):
    from lensray.cli.main import main

    assert main(["screen", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"error: config: file not found: {tmp_path / 'missing.yaml'}"


def test_train_split_smaller_than_max_samples():
    with pytest.raises(LensrayInputError) as info:
        load_config(_cfg(task={"source": "synthetic", "synthetic_rows": 2000}))
    msg = str(info.value)
    assert msg.startswith("grid.max_samples: 3200 is larger than the train split of task 'synthetic' (1680 rows)")
    config = load_config(_cfg(task={"synthetic_rows": 4000}))
    check_train_size(config, 3200)
    with pytest.raises(LensrayInputError, match=r"^grid\.max_samples: .*\(100 rows\)"):
        check_train_size(config, 100)
    assert load_config(_cfg(task={"synthetic_rows": 2000}), check_task=False).grid.max_samples == 3200
