"""NTK features through Curves: per-point F, its extension to the target, the ntk_* columns of a
curves table, and the LensLLM selector's phase mode from them."""

from __future__ import annotations

import numpy as np
import pytest

from lensray.core.curves import Curves, load_curves_csv
from lensray.core.ntk_term import NTKTerms, residual_norm
from lensray.core.selection import get_selector
from lensray.core.synthetic_zoo import write_curves_csv
from lensray.errors import LensrayInputError

D = np.array([0] + [200 * 2**i for i in range(8)] + [1_638_400], dtype=float)
TARGET = 1_638_400
ETA = 1e-3


def _lensllm_zoo(n: int = 6, seed: int = 0, gamma: float = 5.0) -> tuple[Curves, dict]:
    """Curves drawn from the LensLLM law with F(Θ, t) of a random spectrum, t = ceil(3 D / 16)."""
    rng = np.random.default_rng(seed)
    eig = np.geomspace(0.1, 1e-4, 8)[None].repeat(n, 0) * rng.uniform(0.5, 2, (n, 1))
    coef = rng.normal(0, 1, (n, 8))
    t = np.ceil(3 * D / 16)[None].repeat(n, 0)
    F = np.array([residual_norm(eig[i], coef[i], ETA, t[i]) for i in range(n)])
    B, beta, E = rng.uniform(50, 200, n), rng.uniform(0.3, 0.5, n), rng.uniform(0.8, 1.5, n)
    L = B[:, None] / (gamma * F + D[None] ** beta[:, None]) + E[:, None]
    assert np.all(np.diff(L, axis=1) < 0)
    ntk = NTKTerms(F, t, np.full(n, ETA), eig, coef)
    return Curves([f"m{i}" for i in range(n)], D, L, ntk=ntk), {"F": F, "beta": beta, "gamma": gamma}


def test_F_at_takes_the_probe_then_extends_by_the_spectrum():
    zoo, truth = _lensllm_zoo()
    seen = zoo.budget(25600)
    assert np.array_equal(seen.ntk.F_at(seen.D, 800), truth["F"][:, 3])  # a probe's own F
    # the target: steps scaled from the largest probe (4800 steps at 25600 samples -> 307200)
    assert np.array_equal(seen.ntk.steps_at(seen.D, TARGET), np.full(len(zoo), 4800 * 64))
    want = [residual_norm(zoo.ntk.eigenvalues[i], zoo.ntk.coefficients[i], ETA, 307200) for i in range(len(zoo))]
    assert np.allclose(seen.ntk.F_at(seen.D, TARGET), want)
    capped = NTKTerms(seen.ntk.F, np.minimum(seen.ntk.t, 600.0), seen.ntk.eta, seen.ntk.eigenvalues,
                      seen.ntk.coefficients)
    assert np.array_equal(capped.steps_at(seen.D, TARGET), np.full(len(zoo), 600.0))  # max_steps reached
    bare = NTKTerms(seen.ntk.F)  # no steps, no spectrum: F only where a probe has it
    assert np.all(np.isnan(bare.F_at(seen.D, TARGET))) and not bare.has_spectrum().any()


def test_from_records_reads_each_probe_and_one_spectrum():
    feats = {"eigenvalues": [2.0, 0.5], "coefficients": [1.0, -1.0], "learning_rate": 1e-3}
    rows = [{0: {"F": 2.0, "steps": 0, **feats}, 400: {"F": 1.5, "steps": 75, **feats}}, {}]
    ntk = NTKTerms.from_records(np.array([0, 200, 400.0]), rows)
    assert np.array_equal(ntk.F[0], [2.0, np.nan, 1.5], equal_nan=True) and np.isnan(ntk.F[1]).all()
    assert ntk.has_spectrum().tolist() == [True, False] and ntk.eta[0] == 1e-3
    assert NTKTerms.from_records(np.array([0, 200.0]), [{}, {}]) is None


def test_lensllm_phase_mode_uses_the_probes_F():
    zoo, truth = _lensllm_zoo()
    seen = zoo.budget(25600)
    pred = get_selector("lensllm").predict(seen, TARGET)
    assert pred.notes and "phase mode" in pred.notes[0]
    F_target = seen.ntk.F_at(seen.D, TARGET)
    for i in range(len(zoo)):
        params = pred.named_params(i)
        assert list(params) == ["B", "F", "beta", "E", "gamma", "F_ntk"]
        assert params["F_ntk"] == F_target[i]  # the probes' own F at D*, not a fitted one
        assert params["F"] == pytest.approx(params["gamma"] * F_target[i], rel=1e-12)
        assert params["gamma"] == pytest.approx(truth["gamma"], rel=1e-3)
        assert params["beta"] == pytest.approx(truth["beta"][i], rel=1e-3)
    assert np.allclose(pred.loss, zoo.L[:, -1], rtol=1e-3)


def test_lensllm_without_complete_features_fits_F_free_and_says_where():
    zoo, _ = _lensllm_zoo()
    seen = zoo.budget(25600)
    seen.ntk.F[2, 4] = np.nan
    pred = get_selector("lensllm").predict(seen, TARGET)
    assert pred.notes == ["lensllm: F fitted per candidate (prediction mode): no NTK F for 'm2' at D=1600"]
    assert list(pred.named_params(0)) == ["B", "F", "beta", "E"] and pred.ok.all()
    seen.ntk = NTKTerms(zoo.budget(25600).ntk.F)  # F at every probe, but nothing to extend it to D*
    assert "at the target D=1.6384e+06" in get_selector("lensllm").predict(seen, TARGET).notes[0]
    seen.ntk = None
    assert "no NTK features" in get_selector("lensllm").predict(seen, TARGET).notes[0]


def test_curves_table_round_trips_ntk_columns(tmp_path):
    zoo, _ = _lensllm_zoo(3)
    zoo.ntk.F[1, 2] = np.nan  # a missing cell stays missing
    back = load_curves_csv(write_curves_csv(zoo, tmp_path / "z.csv"))
    for name in ("F", "t", "eta", "eigenvalues", "coefficients"):
        assert np.array_equal(getattr(back.ntk, name), getattr(zoo.ntk, name), equal_nan=True), name
    part = back.take([2, 0]).budget(3200)
    assert part.ntk.F.shape == (2, 6) and np.array_equal(part.ntk.F, zoo.ntk.F[[2, 0], :6])
    plain = tmp_path / "plain.csv"
    plain.write_text("config name,0,200,400,800\na,3,2,1.5,1.2\n")
    assert load_curves_csv(plain).ntk is None


HEADER = "config name,0,200,400,800,ntk_F@0,ntk_F@200,ntk_F@400,ntk_F@800,ntk_t@800,ntk_eta,ntk_eig_1,ntk_coef_1,ntk_trace"


@pytest.mark.parametrize(
    "header, row, message",
    [
        (HEADER, "a,3,2,1.5,1.2,9,8,x,6,150,0.001,1.0,0.5,7", "row 'a' (line 2), column 'ntk_F@400': NTK value 'x' is not a number"),
        (HEADER, "a,3,2,1.5,1.2,9,8,-7,6,150,0.001,1.0,0.5,7", "column 'ntk_F@400': NTK value must be a finite number >= 0"),
        (HEADER, "a,3,2,1.5,1.2,9,8,7,6,150,0,1.0,0.5,7", "column 'ntk_eta': NTK value must be a finite positive number"),
        (HEADER, "a,3,2,1.5,1.2,9,8,7,6,150,0.001,1.0,inf,7", "column 'ntk_coef_1': NTK value must be a finite number"),
        (HEADER.replace("ntk_F@800", "ntk_F@300"), "a,3,2,1.5,1.2,9,8,7,6,150,0.001,1.0,0.5,7",
         "column 'ntk_F@300': there is no sample-size column '300'"),
        (HEADER.replace("ntk_coef_1", "notes"), "a,3,2,1.5,1.2,9,8,7,6,150,0.001,1.0,0.5,7",
         "column 'ntk_eig_1' has no partner column 'ntk_coef_1'"),
        (HEADER.replace("ntk_F@800", "ntk_F@big"), "a,3,2,1.5,1.2,9,8,7,6,150,0.001,1.0,0.5,7",
         "column 'ntk_F@big': NTK columns per size are named"),
    ],
)
def test_malformed_ntk_columns_name_the_column_and_row(tmp_path, header, row, message):
    path = tmp_path / "bad.csv"
    path.write_text(f"{header}\n{row}\n")
    with pytest.raises(LensrayInputError) as err:
        load_curves_csv(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_empty_ntk_cells_are_missing_not_errors(tmp_path):
    path = tmp_path / "partial.csv"
    path.write_text(f"{HEADER}\na,3,2,1.5,1.2,9,8,,6,150,0.001,1.0,0.5,7\nb,3,2,1.6,1.3,,,,,,,,,\n")
    ntk = load_curves_csv(path).ntk
    assert np.isnan(ntk.F[0, 2]) and ntk.F[0, 3] == 6 and np.isnan(ntk.F[1]).all()
    assert ntk.has_spectrum().tolist() == [True, False] and ntk.t[0, 3] == 150
