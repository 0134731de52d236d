import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from hf_resdecay.evaluation import effective_rank


def _numpy_reference(features, eps=1e-7):
    s = np.linalg.svd(np.asarray(features, dtype=np.float64), compute_uv=False)
    p = s / s.sum() + eps
    return -(p * np.log(p)).sum()


@pytest.mark.parametrize("shape", [(300, 40), (40, 300), (1000, 5)])
def test_matches_numpy_svd(shape):
    features = np.random.default_rng(1).normal(size=shape) @ np.diag(np.linspace(0.1, 3, shape[1]))
    entropy = _numpy_reference(features)
    assert effective_rank(features, kind="entropy") == pytest.approx(entropy, rel=1e-10)
    assert effective_rank(features, kind="rankme") == pytest.approx(np.exp(entropy), rel=1e-10)


def test_sanity_figures_from_the_project_notes():
    torch.manual_seed(0)
    assert effective_rank(torch.randn(25600, 100)) == pytest.approx(99.95, abs=0.02)
    assert effective_rank(torch.randn(256, 100)) == pytest.approx(94.30, abs=0.5)
    assert effective_rank(torch.randn(100, 1) @ torch.randn(1, 30)) == pytest.approx(1.0, abs=1e-3)
    assert effective_rank(load_digits().data) == pytest.approx(29.63, abs=0.01)


def test_uncentred_mean_direction_counts():
    """A large common offset is one more direction of the uncentred matrix: the rank drops towards 1."""
    features = np.random.default_rng(0).normal(size=(500, 20))
    assert effective_rank(features + 100.0) < 2.0 < effective_rank(features)


def test_bad_input():
    with pytest.raises(ValueError, match="kind must be one of 'entropy', 'rankme'"):
        effective_rank(np.ones((3, 3)), kind="shannon")
    with pytest.raises(ValueError, match="all zero"):
        effective_rank(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="NaN or inf"):
        effective_rank(np.array([[1.0, np.inf], [0.0, 1.0]]))
