"""Property-based checks of the input promise, with generated valid and broken inputs.

For every generated config, curves table, stored probe record, task file and argument list:
the CLI exits 0 or 2 (argparse's own usage errors are 2 too), never with an exception; nothing
is written outside the output folder; every file stored before is still there afterwards (a
damaged probe record only renamed, byte for byte). Ray is never started (plans, benchmarks,
zero-shot probes). The runs are derandomized and bounded (``max_examples``) so the suite takes
well under a minute on one core; ``COUNTS`` tallies the cases and their outcomes per class.
"""

from __future__ import annotations

import collections
import json
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lensray.cli.main import main
from lensray.run.store import DAMAGED_MARK, ProbeStore, candidate_key

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TINY = "tiny:gpt2:n_layer=1,n_embd=32"
GRID = [0, 200, 400, 800, 1600, 3200]
IDS = ["alpha", "beta", "gamma"]
COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    for name, c in sorted(COUNTS.items()):
        print(f"fuzz {name}: {sum(c.values())} cases, " + ", ".join(f"{k}: {v}" for k, v in sorted(c.items())))


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LENSRAY_CACHE", str(tmp_path_factory.getbasetemp() / "fuzz-cache"))

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr("lensray.run.screen._init_ray", refuse)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _run(capsys, argv: list[str], kind: str) -> int:
    """``lensray argv`` in process: exit 0 or 2, one error line at most, never a traceback."""
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse: usage error
        rc = exc.code
    captured = capsys.readouterr()
    assert rc in (0, 2), (argv, rc, captured.err[-2000:])
    assert "Traceback" not in captured.err
    if rc == 2:
        errors = [ln for ln in captured.err.splitlines() if "error:" in ln]
        assert errors, captured.err
    COUNTS[kind][f"exit {rc}"] += 1
    return rc


def _checked(root: Path, argv_of, capsys, kind: str, out: str = "out") -> int:
    """Run in ``root``; nothing new outside ``root/out`` and nothing there lost."""
    before = _tree(root)
    rc = _run(capsys, argv_of(root), kind)
    after = _tree(root)
    outside = {k for k in after if not k.startswith(out + os.sep)} - set(before)
    assert not outside, outside
    assert all(k in after and after[k] == v for k, v in before.items() if not k.startswith(out + os.sep))
    return rc


def _write_table(path: Path, rows: list[list[str]], header: list[str]) -> None:
    path.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")


def _good_table(path: Path) -> Path:
    rows = []
    for k, cid in enumerate(IDS):
        losses = [f"{(3.0 + 0.2 * k) * (1 + d / 400) ** -0.3 + 0.5:.5f}" for d in GRID]
        rows.append([cid, *losses, str(10 ** (7 + k)), "f"])
    _write_table(path, rows, ["config name", *map(str, GRID), "size", "family"])
    return path


# ------------------------------------------------------------------ value generators

hostile = st.one_of(
    st.integers(-10**15, 10**15), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.booleans(), st.none(), st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text("abc", max_size=3), st.integers(), max_size=2),
    st.sampled_from([10**12, 10**30, -1, 0, 1, 0.5, "1e400", "{0}", "../x", "a" * 300]),
)
CONFIG_KEYS = [
    "name", "target_samples", "tokens_per_sample", "grid", "grid.start", "grid.factor", "grid.zero_shot",
    "predictor.method", "predictor.level", "pruning.enabled", "pruning.top_k", "pruning.grace_points",
    "pruning.scout", "ray.num_cpus", "ray.max_concurrent_trials", "task.template", "task.synthetic_rows",
    "task.max_length", "task.test_size", "task.max_bad_fraction", "probe.epochs", "probe.learning_rate",
    "probe.warmup_ratio", "probe.micro_batch", "probe.device", "probe.max_grad_norm", "zoo", "task", "probe",
    "storage.path", "unknown_key", "grid.unknown", "probe.epoch",
]
TEMPLATES = st.one_of(
    st.sampled_from(["{input}", "Q: {input}\nA:", "{input!r}", "{input:>20}", "{0}", "{}", "{input!z}",
                     "{input:%%}", "{input.x}", "{input[0]}", "{input:{w}}", "{", "}", "{missing}", "{{literal}}"]),
    st.text("{}!:.[]0aisnput", max_size=12),
)


def _set(data: dict, key: str, value) -> None:
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


VALID_EDITS = st.sampled_from([
    ("predictor.level", 0.8), ("pruning.top_k", 1), ("pruning.scout", False), ("probe.epochs", 2.5),
    ("task.template", "Q: {input}"), ("tokens_per_sample", 50), ("predictor.method", "rectified"),
    ("grid.zero_shot", False), ("ray.num_cpus", 2), ("name", "x"), ("target_samples", 10**7),
])
configs = st.one_of(
    st.lists(st.tuples(st.sampled_from(CONFIG_KEYS), st.one_of(hostile, TEMPLATES)), max_size=3).map(
        lambda edits: ("edits", edits)),
    st.lists(VALID_EDITS, max_size=3).map(lambda edits: ("edits", edits)),
    st.text(max_size=40).map(lambda text: ("text", text)),
)


@FUZZ
@given(configs)
def test_fuzz_configs(capsys, spec):
    """A config (valid, or with wrong types, unknown keys, out-of-range, huge or non-finite
    values, or not YAML at all) on a replayed table, planned."""
    kind, payload = spec
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        table = _good_table(root / "t.csv")
        if kind == "text":
            (root / "c.yaml").write_text(payload, encoding="utf-8")
        else:
            data: dict = {"predictor": {"method": "lensray"}}
            for key, value in payload:
                _set(data, key, value)
            (root / "c.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
        _checked(root, lambda r: ["screen", str(r / "c.yaml"), "--replay", str(table), "--max-samples", "3200",
                                  "--plan", "--out", str(r / "out")], capsys, "configs")


cells = st.one_of(
    st.floats(0.01, 20).map(lambda v: f"{v:.4f}"), st.sampled_from(["", "nan", "NaN", "-1", "0", "inf", "abc", " "]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text("0123456789.-e,\"", max_size=6),
)


@st.composite
def tables(draw):
    if draw(st.booleans()):  # a valid table, holes allowed
        rows = [[cid, *[draw(st.sampled_from(["", f"{3.0 - 0.1 * k - 1e-4 * d:.4f}"])) if d > 200 else
                        f"{3.0 - 0.1 * k:.4f}" for d in GRID], draw(st.sampled_from(["", "1e7", "3e9"])), "f"]
                for k, cid in enumerate(IDS)]
        return ["config name", *map(str, GRID), "size", "family"], rows
    n_cols = draw(st.integers(1, 7))
    ds = draw(st.lists(st.sampled_from(GRID + [6400, -5, 1.5]), min_size=n_cols, max_size=n_cols))
    header = ["config name", *map(str, ds), "size", "family"]
    if draw(st.booleans()):
        header = draw(st.permutations(header))
    rows = []
    for _ in range(draw(st.integers(0, 4))):
        cid = draw(st.sampled_from(IDS + ["", "alpha", "../../etc"]))
        rows.append([cid, *[draw(cells) for _ in ds], draw(cells), draw(st.sampled_from(["f", ""]))])
    if rows and draw(st.booleans()):
        rows[-1] = rows[-1][: draw(st.integers(0, len(rows[-1])))]
    return header, rows


@FUZZ
@given(tables(), st.sampled_from(["3200", "800", "0", "-1"]))
def test_fuzz_curves_tables(capsys, table, max_samples):
    """A curves table with missing cells, strings, NaN, negative values, duplicate ids and
    ragged rows: replay plan and benchmark."""
    header, rows = table
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _write_table(root / "t.csv", rows, header)
        _checked(root, lambda r: ["screen", "--replay", str(r / "t.csv"), "--max-samples", max_samples, "--plan",
                                  "--out", str(r / "out")], capsys, "curves tables (replay plan)")
        _checked(root, lambda r: ["benchmark", "--curves", str(r / "t.csv"), "--methods", "zeroshot,modelsize",
                                  "--ratios", "2,4", "--target", "3200", "--json"], capsys,
                 "curves tables (benchmark)")


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=False), st.text(max_size=6)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=6,
)
FIELDS = ("candidate", "n_samples", "status", "test_loss", "tokens", "flops", "n_params", "wall_seconds")


@st.composite
def records(draw):
    cid = draw(st.sampled_from(IDS))
    n = draw(st.sampled_from(GRID))
    good = {"candidate": cid, "n_samples": n, "status": "ok", "test_loss": 2.5, "tokens": 35 * n, "flops": 1e9,
            "n_params": 10**7, "wall_seconds": 1.0}
    shape = draw(st.sampled_from(["fields", "value", "bytes"]))
    if shape == "value":
        body = json.dumps(draw(json_values)).encode()
    elif shape == "bytes":
        body = draw(st.binary(max_size=30))
    else:
        for key in draw(st.lists(st.sampled_from(FIELDS), max_size=3, unique=True)):
            good[key] = draw(json_values)
        body = json.dumps(good).encode()
    return cid, n, body


@FUZZ
@given(st.lists(records(), min_size=1, max_size=4))
def test_fuzz_stored_records(capsys, recs):
    """Stored probe records with random JSON in their fields (or not JSON at all): a plan reads
    them and writes nothing; the store keeps every file (damaged ones set aside, unchanged)
    and the ranking fits what is valid."""
    from lensray.run.config import replay_config
    from lensray.run.ranking import rank
    from lensray.run.store import make_plan

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        table = _good_table(root / "t.csv")
        store = ProbeStore(str(root / "out"))
        for cid in IDS:  # a full, valid run stored first
            for d in GRID:
                store.put(cid, {"n_samples": d, "status": "ok", "test_loss": 3.0 - 1e-4 * d, "tokens": 35 * d,
                                "flops": 1e9, "n_params": 10**7})
        for cid, n, body in recs:
            (root / "out" / "probes" / candidate_key(cid) / f"{n}.json").write_bytes(body)
        before = _tree(root / "out")
        argv = ["screen", "--replay", str(table), "--max-samples", "3200", "--plan", "--out", str(root / "out")]
        assert _checked(root, lambda r: argv, capsys, "stored records (plan)", out="\0") == 0
        assert _tree(root / "out") == before  # a plan writes nothing, not even the set-aside renames
        config, curves = replay_config(table, None, {"grid.max_samples": 3200, "storage.path": str(root / "out")})
        plans = make_plan(config, store, GRID, None)
        rank(config, store, GRID, "replay", curves, 0.0)
        after = _tree(root / "out")
        for name, body in before.items():
            if name not in after:
                moved = [k for k in after if k.startswith(name + DAMAGED_MARK)]
                assert len(moved) == 1 and after[moved[0]] == body, name
        redo = {(p.candidate.id, d) for p in plans for d in p.todo}
        for cid, n in {(cid, n) for cid, n, _ in recs}:
            path = root / "out" / "probes" / candidate_key(cid) / f"{n}.json"
            usable = path.is_file() and json.loads(path.read_text()).get("status", "ok") == "ok"
            assert usable != ((cid, n) in redo), (cid, n)
        COUNTS["stored records (store)"]["probes to run again"] += len(redo)


row_values = st.one_of(st.text(max_size=6), st.sampled_from(["", " ", "\t"]), st.integers(), st.floats(), st.none(),
                       st.lists(st.integers(), max_size=2), st.booleans())


@st.composite
def task_files(draw):
    n = draw(st.sampled_from([0, 3, 120]))
    columns = draw(st.lists(st.sampled_from(["input", "target", "text", "q"]), min_size=1, max_size=3, unique=True))
    constant = draw(st.dictionaries(st.sampled_from(columns), row_values, max_size=2))
    rows = [{c: constant.get(c, f"{c}{i}") for c in columns} for i in range(n)]
    task = {"source": "ROWS", "test_size": draw(st.sampled_from([8, 0.1, 1000, -1])), "validation_size": 4}
    for key in draw(st.lists(st.sampled_from(["template", "text_column", "target_column", "max_bad_fraction"]),
                             max_size=2, unique=True)):
        task[key] = draw(TEMPLATES if key == "template" else st.one_of(st.sampled_from(columns), hostile))
    return rows, task


@FUZZ
@given(task_files())
def test_fuzz_task_rows_and_templates(capsys, spec):
    """A local task file (constant, empty, non-text or missing columns) and a random template:
    screening config planned (the task is loaded and sized before any Ray work)."""
    rows, task = spec
    if not rows and task.get("test_size") == 8:  # the valid shape: text rows, a usable template
        rows = [{"input": f"q{i}", "target": f"a{i}"} for i in range(120)]
        task = {"source": "ROWS", "test_size": 8, "validation_size": 4, "template": "Q: {input!s}\nA:"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "rows.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        task["source"] = str(data)
        config = {"zoo": [{"id": "a", "model": TINY, "size": 1e6}], "grid": {"start": 10, "max_samples": 40},
                  "task": task}
        (root / "c.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
        _checked(root, lambda r: ["screen", str(r / "c.yaml"), "--plan", "--out", str(r / "out")], capsys,
                 "task rows/templates")


PROBE_MODELS = ["tiny:gpt2:n_layer=abc", "tiny:gpt2:n_layer=-1", "tiny:gpt2:n_embd=30", "tiny:rnn",
                "tiny:gpt2:seed=-3", "tiny:gpt2:n_layer=1,n_embd=32,wings=2", "./no/such/folder", ""]
ARGS = {
    "probe": {"--model": st.sampled_from(PROBE_MODELS), "--sizes": st.sampled_from(["0", "-1", "a", "0,0", "", "5,x"]),
              "--device": st.sampled_from(["cpu", "tpu", "auto", ""]), "--seed": st.sampled_from(["1", "x", "-1"]),
              "--task": st.sampled_from(["synthetic", "nope.yaml", ""])},
    "benchmark": {"--curves": st.sampled_from(["T", "nope.csv", ""]), "--ratios": st.sampled_from(["2,4", "8", "0", "a", "2,2"]),
                  "--methods": st.sampled_from(["zeroshot", "modelsize", "nope", "", "zeroshot,zeroshot"]),
                  "--target": st.sampled_from(["3200", "0", "-5", "x"])},
    "screen": {"--replay": st.sampled_from(["T", "nope.csv"]), "--max-samples": st.sampled_from(["3200", "0", "x"]),
               "--target-samples": st.sampled_from(["100", "-1", "10000000000000"]), "--resume": st.just(None),
               "--address": st.sampled_from(["auto", ""]), "--out": st.sampled_from(["OUT", "", "/dev/null/x"])},
}


@st.composite
def argvs(draw):
    command = draw(st.sampled_from(sorted(ARGS)))
    if draw(st.integers(0, 3)) == 0:  # a valid command line
        return {"benchmark": ["benchmark", "--curves", "T", "--methods", "zeroshot", "--ratios", "2", "--target",
                              "3200", "--json"],
                "screen": ["screen", "--replay", "T", "--max-samples", "3200", "--plan", "--out", "OUT"],
                "probe": ["probe", "--model", draw(st.sampled_from(PROBE_MODELS)), "--sizes", "0"]}[command]
    flags = draw(st.lists(st.sampled_from(sorted(ARGS[command])), unique=True, max_size=4))
    argv = [command]
    for flag in flags:
        value = draw(ARGS[command][flag])
        argv += [flag] if value is None else [flag, value]
    if command == "screen":
        argv.append("--plan")  # a valid screen would start Ray; planned instead
    if draw(st.booleans()):
        argv.append(draw(st.sampled_from(["--bogus", "extra", "--json"])))
    return argv


@FUZZ
@given(argvs())
def test_fuzz_cli_arguments(capsys, argv):
    """Random flags and values of every command (bad ids, sizes, devices, numbers, paths)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        table = str(_good_table(root / "t.csv"))
        argv = [table if a == "T" else str(root / "out") if a == "OUT" else a for a in argv]
        if argv[0] == "screen" and "--replay" not in argv:
            argv += ["--replay", table]
        cwd = os.getcwd()
        os.chdir(root)  # relative paths land in the temporary folder
        try:
            _checked(root, lambda r: argv, capsys, "CLI arguments", out="out")
        finally:
            os.chdir(cwd)

