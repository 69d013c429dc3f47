"""Curves table: loading, budgets, and every bad input through the real CLI (exit 2, one line)."""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lensray.cli.main import main
from lensray.core.curves import Curves, load_curves_csv
from lensray.errors import LensrayInputError

HEADER = "config name,0,200,400,800,1600,size,family"
GOOD = f"""{HEADER}
model-a,4.0,3.5,3.2,3.0,2.9,1000,fam-a
model-b,5.0,3.0,2.8,2.6,2.5,,
model-c,3.0,2.9,2.8,2.7,2.65,3e9,fam-c
"""


def write(tmp_path: Path, text: str, name: str = "t.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_loads_a_good_table(tmp_path):
    c = load_curves_csv(write(tmp_path, GOOD))
    assert c.ids == ["model-a", "model-b", "model-c"]
    np.testing.assert_array_equal(c.D, [0, 200, 400, 800, 1600])
    assert c.L.shape == (3, 5) and c.L[1, 1] == 3.0
    assert c.size[0] == 1000 and np.isnan(c.size[1]) and c.size[2] == 3e9
    assert c.family == ["fam-a", None, "fam-c"]
    assert c.name == "t" and len(c) == 3


def test_tolerates_bom_spaces_blank_lines_and_extra_columns(tmp_path):
    text = "\ufeff,Config Name , 0 ,200,400,800,note\n\n0,a,4,3,2.5,2.2,x\n1,b,5,4,3.5,3.1,y\n\n"
    c = load_curves_csv(write(tmp_path, text))
    assert c.ids == ["a", "b"]
    np.testing.assert_array_equal(c.D, [0, 200, 400, 800])
    assert not c.has_size and c.family == [None, None]


def test_shared_tables_load(benchmarks_dir):
    for name in ("flan", "wmt19"):
        c = load_curves_csv(benchmarks_dir / f"{name}.csv")
        assert len(c) == 30 and c.D[0] == 0 and c.D[-1] == 1_638_400 and c.D.size == 15
        assert np.isfinite(c.L).all() and (c.L > 0).all()
        assert c.has_size and c.name == name


def test_budget_keeps_zero_shot_and_columns_up_to_max(tmp_path):
    c = load_curves_csv(write(tmp_path, GOOD))
    b = c.budget(900)
    np.testing.assert_array_equal(b.D, [0, 200, 400, 800])
    np.testing.assert_array_equal(b.L, c.L[:, :4])
    assert b.ids == c.ids and b.name == c.name
    with pytest.raises(LensrayInputError, match="max_samples=400 leaves 2 points"):
        c.budget(400)


def test_loss_at_and_take(tmp_path):
    c = load_curves_csv(write(tmp_path, GOOD))
    np.testing.assert_array_equal(c.loss_at(1600), [2.9, 2.5, 2.65])
    with pytest.raises(LensrayInputError, match="no column '999'"):
        c.loss_at(999)
    t = c.take([2, 0])
    assert t.ids == ["model-c", "model-a"] and t.family == ["fam-c", "fam-a"]
    np.testing.assert_array_equal(t.L, c.L[[2, 0]])


def test_require_size_names_the_column(tmp_path):
    c = load_curves_csv(write(tmp_path, "config name,200,400,800\na,3,2.5,2\nb,4,3,2.5\n"))
    with pytest.raises(LensrayInputError, match="column 'size' is required by modelsize"):
        c.require_size("modelsize")
    assert load_curves_csv(write(tmp_path, GOOD)).require_size()[0] == 1000


def test_sizes_with_a_unit_suffix(tmp_path):
    text = f"{HEADER}\na,4,3.5,3.2,3,2.9,1.3B,f\nb,4,3.5,3.2,3,2.9,350m,f\nc,4,3.5,3.2,3,2.9,2k,f\n"
    assert load_curves_csv(write(tmp_path, text)).size.tolist() == pytest.approx([1.3e9, 3.5e8, 2e3])
    with pytest.raises(LensrayInputError, match="size '1.3X' is not a number"):
        load_curves_csv(write(tmp_path, text.replace("1.3B", "1.3X")))
    with pytest.raises(LensrayInputError, match="size must be a finite positive"):
        load_curves_csv(write(tmp_path, text.replace("1.3B", "-1B")))


def test_missing_points_allowed_only_on_request(tmp_path):
    path = write(tmp_path, "config name,200,400,800,1600\na,3,2.5,,nan\nb,4,3,2.5,2.2\n")
    with pytest.raises(LensrayInputError, match=r"row 'a' \(line 2\), column '800': loss is missing"):
        load_curves_csv(path)
    c = load_curves_csv(path, allow_missing=True)
    assert np.isnan(c.L[0, 2:]).all() and np.isfinite(c.L[1]).all()


def test_constructor_defaults_and_shape_checks():
    c = Curves(["a", "b"], [0, 200, 400, 800], np.ones((2, 4)))
    assert c.D.dtype == np.float64 and np.isnan(c.size).all() and c.family == [None, None]
    with pytest.raises(ValueError, match="shape"):
        Curves(["a"], [200, 400], np.ones((2, 2)))
    with pytest.raises(ValueError, match="increasing"):
        Curves(["a"], [400, 200], np.ones((1, 2)))


ROW_B = "model-b,5.0,3.0,2.8,2.6,2.5,2000,fam"
BAD_TABLES = {
    "missing id column": ("model,0,200,400,800\na,4,3,2,1\n", "missing column 'config name'"),
    "duplicate column": ("config name,0,200,400,400,800\na,4,3,2,1.5,1\n", "duplicate column '400'"),
    "duplicate numeric column": ("config name,200,400,400.0,800\na,3,2,1.5,1\n", "duplicate sample-size column"),
    "duplicate size column": ("config name,200,400,800,size,Size\na,3,2,1,5,5\n", "duplicate column 'Size'"),
    "sizes not increasing": ("config name,0,400,200,800\na,4,3,2,1\n", "not increasing: column '200'"),
    "negative column": ("config name,-200,400,800,1600\na,4,3,2,1\n", "column '-200'"),
    "too few columns": ("config name,0,200,400\na,4,3,2\n", "at least 3 sample-size columns"),
    "non-numeric loss": (f"{HEADER}\nmodel-a,4.0,abc,3.2,3.0,2.9,1000,f\n{ROW_B}\n", "row 'model-a' (line 2), column '200'"),
    "zero loss": (f"{HEADER}\n{ROW_B}\nmodel-a,4.0,3.5,0,3.0,2.9,1000,f\n", "row 'model-a' (line 3), column '400'"),
    "negative loss": (f"{HEADER}\nmodel-a,4.0,3.5,3.2,-3.0,2.9,1000,f\n{ROW_B}\n", "finite positive"),
    "infinite loss": (f"{HEADER}\nmodel-a,4.0,3.5,3.2,inf,2.9,1000,f\n{ROW_B}\n", "column '800': loss must be"),
    # an empty or NaN loss is "not measured": the benchmark scores around it (test_benchmark.py)
    "truth missing on all but one row": (f"{HEADER}\n{ROW_B}\nmodel-a,4.0,3.5,3.2,3.0,NaN,1000,f\n",
                                         "at least 2 models with a loss at D*=1600, the curves table has 1 (row 'model-a'"),
    "duplicate model id": (f"{HEADER}\n{ROW_B}\n{ROW_B}\n", "row 'model-b' (line 3): duplicate model id, first on line 2"),
    "empty model id": (f"{HEADER}\n,4.0,3.5,3.2,3.0,2.9,1000,f\n", "line 2: empty model id"),
    "short row": (f"{HEADER}\nmodel-a,4.0,3.5,3.2\n", "line 2 has 4 cells"),
    "non-numeric size": (f"{HEADER}\nmodel-a,4.0,3.5,3.2,3.0,2.9,big,f\n", "column 'size': size 'big' is not a number"),
    "negative size": (f"{HEADER}\nmodel-a,4.0,3.5,3.2,3.0,2.9,-5,f\n", "size must be a finite positive"),
    "empty file": ("", "is empty"),
    "header only": (f"{HEADER}\n", "no model rows"),
}


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["benchmark", *argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_one_line_error(rc: int, err: str, expected: str) -> None:
    assert rc == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], lines[0]


@pytest.mark.parametrize("case", sorted(BAD_TABLES))
def test_bad_table_through_cli(tmp_path, capsys, case):
    text, expected = BAD_TABLES[case]
    rc, out, err = run_cli(capsys, "--curves", str(write(tmp_path, text)), "--target", "1600")
    assert_one_line_error(rc, err, expected)
    assert out == ""


def test_missing_and_unreadable_files_through_cli(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "--curves", str(tmp_path / "nope.csv"))
    assert_one_line_error(rc, err, "not found")
    rc, _, err = run_cli(capsys, "--curves", str(tmp_path))
    assert_one_line_error(rc, err, "is a directory")
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"config name,200\n\xff\xfe\x00bad\n")
    rc, _, err = run_cli(capsys, "--curves", str(binary))
    assert_one_line_error(rc, err, "not UTF-8")


def test_budget_too_small_through_cli(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "--curves", str(write(tmp_path, GOOD)), "--target", "1600", "--ratios", "2,8")
    assert_one_line_error(rc, err, "ratio 8: budget max_samples=200 leaves 1 points with D > 0")


def test_target_column_absent_through_cli(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "--curves", str(write(tmp_path, GOOD)), "--target", "3200", "--ratios", "2")
    assert_one_line_error(rc, err, "--target 3200: no column '3200'")


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    n=st.integers(1, 6),
    m=st.integers(3, 8),
    zero=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_written_tables_load_back_exactly(tmp_path_factory, n, m, zero, seed):
    rng = np.random.default_rng(seed)
    D = 100 * np.cumsum(rng.integers(1, 5, size=m))
    D = np.r_[0, D] if zero else D
    L = rng.uniform(0.01, 30, size=(n, D.size))
    size = np.where(rng.random(n) < 0.3, np.nan, rng.integers(1, 10**10, size=n).astype(float))
    ids = [f"org/model-{i}" for i in range(n)]
    lines = ["config name," + ",".join(str(int(d)) for d in D) + ",size,family"]
    for i in range(n):
        s = "" if np.isnan(size[i]) else f"{size[i]:.0f}"
        lines.append(f"{ids[i]}," + ",".join(repr(float(x)) for x in L[i]) + f",{s},f{i}")
    path = tmp_path_factory.mktemp("rt") / "t.csv"
    path.write_text("\n".join(lines) + "\n")
    c = load_curves_csv(path)
    assert c.ids == ids and c.family == [f"f{i}" for i in range(n)]
    np.testing.assert_array_equal(c.D, D)
    np.testing.assert_array_equal(c.L, L)
    np.testing.assert_array_equal(c.size, size)


def test_missing_lists_the_unmeasured_sizes_per_row():
    c = Curves(["a", "b", "c"], [0, 200, 400, 800],
               np.array([[4, 3, np.nan, 2], [4, 3, 2.5, 2], [np.nan, 3, 2.5, np.nan]]))
    assert c.missing() == {"a": [400], "c": [0, 800]}
