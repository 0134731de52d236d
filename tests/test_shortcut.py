import math

import numpy as np
import pytest

from hf_resdecay import SHORTCUT_SCHEDULES, alpha_eff, shortcut_coefficients


@pytest.mark.parametrize("num_sublayers", [2, 3, 8, 24])
@pytest.mark.parametrize("decay", [0.0, 0.2, 0.3, 0.4, 0.99])
def test_linear_matches_released_code_formula(num_sublayers, decay):
    expected = [1 - decay * k / (num_sublayers - 1) for k in range(num_sublayers)]
    got = shortcut_coefficients(num_sublayers, decay)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-15)
    assert got[0] == 1.0
    assert got[-1] == pytest.approx(1 - decay, abs=1e-15)


def test_single_sublayer_keeps_identity():
    assert shortcut_coefficients(1, 0.3) == [1.0]
    assert shortcut_coefficients(1, 0.3, "cosine") == [1.0]
    assert shortcut_coefficients(1, 0.3, "constant") == [pytest.approx(0.7)]


def test_zero_decay_is_standard_residual_for_every_schedule():
    for schedule in SHORTCUT_SCHEDULES:
        assert shortcut_coefficients(10, 0, schedule) == [1.0] * 10


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_decaying_schedules_fall_monotonically_from_one_to_alpha_min(schedule):
    alphas = np.array(shortcut_coefficients(24, 0.35, schedule))
    assert alphas[0] == 1.0
    assert alphas[-1] == pytest.approx(0.65)
    assert np.all(np.diff(alphas) < 0)


def test_cosine_is_flatter_than_linear_at_the_ends():
    linear = shortcut_coefficients(24, 0.3)
    cosine = shortcut_coefficients(24, 0.3, "cosine")
    assert cosine[1] > linear[1] and cosine[-2] < linear[-2]
    expected = [0.7 + 0.3 * (1 + math.cos(math.pi * k / 23)) / 2 for k in range(24)]
    np.testing.assert_allclose(cosine, expected, atol=1e-12)


def test_constant_schedule():
    assert shortcut_coefficients(6, 0.2, "constant") == [pytest.approx(0.8)] * 6


def test_alpha_eff_is_the_product():
    alphas = shortcut_coefficients(24, 0.3)
    assert alpha_eff(alphas) == pytest.approx(float(np.prod(alphas)), rel=1e-12)
    assert alpha_eff(shortcut_coefficients(24, 0.0)) == 1.0


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5, float("nan"), float("inf"), "0.3", True, None])
def test_bad_decay_names_the_field_and_range(decay):
    with pytest.raises(ValueError, match=r"shortcut_decay.*\[0, 1\)"):
        shortcut_coefficients(4, decay)


def test_unknown_schedule_lists_allowed_values():
    with pytest.raises(ValueError, match=r"shortcut_schedule must be one of 'linear', 'cosine', 'constant'"):
        shortcut_coefficients(4, 0.3, "exponential")


@pytest.mark.parametrize("n", [0, -3, 2.5, True, "4"])
def test_bad_num_sublayers(n):
    with pytest.raises(ValueError, match="num_sublayers must be an integer >= 1"):
        shortcut_coefficients(n, 0.3)
