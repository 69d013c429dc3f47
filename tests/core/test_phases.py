"""AtS phase detection (reference quirks on hand-made curves) and the rectified-law transition."""

import numpy as np
import pytest

from lensray.errors import LensrayInputError
from lensray.core.phases import ats_line, ats_transition

D = 200.0 * 2.0 ** np.arange(8)  # 200 ... 25600


def _wiggly_line(D: np.ndarray, slope: float = -0.1, level: float = 1.0) -> np.ndarray:
    """A power law with a tiny deterministic wiggle (std > 0 everywhere, no point stands out)."""
    wiggle = 0.002 * np.array([1, -1, 1, -1, 1, -1, 1, -1][: D.size])
    return np.exp(level + slope * np.log(D) + wiggle)


def test_no_rejection_never_uses_the_smallest_point():
    L = _wiggly_line(D)
    assert ats_transition(D, L) == 0  # loop ends at p = n - 1: point 0 left out
    a, b, p = ats_line(D, L)
    assert p == D.size - 1
    x, y = np.log(D[1:]), np.log(L[1:])
    np.testing.assert_allclose([a, b], np.polyfit(x, y, 1), rtol=1e-10)


def test_pre_power_points_are_rejected_and_the_line_refit_on_the_rest():
    L = _wiggly_line(D)
    L[:3] = L[3] * np.array([1.30, 1.25, 1.20])  # flat pre-power phase far above the line
    t = ats_transition(D, L)
    assert t == 2  # points 3.. accepted, 2 rejected
    a, b, p = ats_line(D, L)
    assert p == D.size - 3
    np.testing.assert_allclose([a, b], np.polyfit(np.log(D[3:]), np.log(L[3:]), 1), rtol=1e-10)
    assert a == pytest.approx(-0.1, abs=0.01)


def test_rejection_at_step_p_uses_the_last_p_points():
    L = _wiggly_line(D)
    L[-4] *= 1.5  # the 4th largest point is far off the line through the last 3
    assert ats_transition(D, L) == D.size - 3 - 1
    assert ats_line(D, L)[2] == 3


def test_k_or_fewer_points_are_all_used_and_zero_shot_is_ignored():
    Ds = np.array([0.0, 200.0, 400.0, 800.0])
    Ls = np.array([9.0, 3.0, 2.7, 2.5])
    assert ats_transition(Ds, Ls) == -1
    a, b, p = ats_line(Ds, Ls)
    assert p == 3
    np.testing.assert_allclose([a, b], np.polyfit(np.log(Ds[1:]), np.log(Ls[1:]), 1), rtol=1e-12)


def test_ats_needs_two_points():
    with pytest.raises(LensrayInputError, match="at least 2 points"):
        ats_line(np.array([0.0, 200.0]), np.array([5.0, 3.0]))
