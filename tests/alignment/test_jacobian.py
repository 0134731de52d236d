import pytest
import torch
from transformers import ViTConfig
from transformers.models.vit.modeling_vit import ViTLayer

from hf_resdecay.alignment import (
    analysis_attention,
    hutchinson_frobenius_sq,
    jacobian_matvec,
    jacobian_rmatvec,
    residual_jacobian_svd,
)

from .helpers import mlp_block, orthogonal


def _relative(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    return float(((estimate.double() - reference.double()).abs() / reference.double()).max())


def _known_linear(n: int = 40, k: int = 6):
    """``J = U diag(s) V^T`` with distinct singular values and unrelated U, V."""
    u, v = orthogonal(n, 1), orthogonal(n, 2)
    s = torch.linspace(3.0, 0.1, n, dtype=torch.float64)
    matrix = u @ torch.diag(s) @ v.T
    return (lambda h: matrix @ h), matrix, u[:, :k], s[:k], v[:, :k]


@pytest.mark.parametrize("method", ["dense", "randomized"])
def test_recovers_known_singular_triplets_with_paired_signs(method):
    fn, matrix, u, s, v = _known_linear()
    h = torch.zeros(40, dtype=torch.float64)
    result = residual_jacobian_svd(fn, h, 6, method=method, power_iters=3)
    assert result.method == method
    torch.testing.assert_close(result.singular_values, s, rtol=1e-8, atol=0)
    # Each vector matches up to sign, and the signs of a pair agree: J v_i = s_i u_i.
    signs = torch.sign((result.left * u).sum(0))
    torch.testing.assert_close(result.left * signs, u, atol=1e-7, rtol=0)
    torch.testing.assert_close(result.right * signs, v, atol=1e-7, rtol=0)
    torch.testing.assert_close(matrix @ result.right, result.left * result.singular_values, atol=1e-8, rtol=0)
    assert result.frobenius_sq == pytest.approx(float(matrix.pow(2).sum())) if method == "dense" else True


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matrix_free_matches_dense_on_random_mlp_blocks_with_decaying_spectra(seed):
    block = mlp_block(96, 192, seed, decay=0.8)
    h = torch.randn(96, generator=torch.Generator().manual_seed(seed))
    dense = residual_jacobian_svd(block, h, 8, method="dense")
    fast = residual_jacobian_svd(block, h, 8, method="randomized", generator=torch.Generator().manual_seed(0))
    assert fast.dense is None and dense.dense is not None
    assert _relative(fast.singular_values, dense.singular_values) < 1e-3
    cosines = (fast.left * dense.left).sum(0).abs()
    assert float(cosines[:4].min()) > 0.999


def test_matrix_free_matches_dense_on_flat_gaussian_mlp_with_more_iterations():
    block = mlp_block(256, 256, 3)
    h = torch.randn(256, generator=torch.Generator().manual_seed(3))
    dense = residual_jacobian_svd(block, h, 8, method="dense")
    coarse = residual_jacobian_svd(block, h, 8, method="randomized", power_iters=1)
    fine = residual_jacobian_svd(block, h, 8, method="randomized", power_iters=4)
    assert _relative(fine.singular_values, dense.singular_values) < 1e-3
    # The flat spectrum is hard for a short Krylov space: the test would catch a method that is not iterating.
    assert _relative(coarse.singular_values, dense.singular_values) > _relative(
        fine.singular_values, dense.singular_values
    )


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_matrix_free_matches_dense_on_small_vit_block(implementation):
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32, num_attention_heads=2, intermediate_size=64, attn_implementation=implementation
    )
    layer = ViTLayer(config).eval()
    with torch.no_grad():
        for parameter in layer.parameters():
            if parameter.ndim == 2:
                parameter.normal_(0.0, 0.2)
    h = torch.randn(1, 9, 32)

    def branch(x):
        return layer(x) - x

    with analysis_attention():
        dense = residual_jacobian_svd(branch, h, 8, method="dense")
        fast = residual_jacobian_svd(branch, h, 8, method="randomized", power_iters=4, frobenius_probes=32)
    assert dense.left.shape == (9 * 32, 8)
    assert _relative(fast.singular_values, dense.singular_values) < 1e-3
    assert fast.frobenius_sq == pytest.approx(dense.frobenius_sq, rel=0.1)


def test_float64_option_casts_and_agrees():
    block = mlp_block(32, 64, 5, decay=0.7).double()
    h = torch.randn(32)
    result = residual_jacobian_svd(block, h, 4, dtype=torch.float64, method="randomized", power_iters=3)
    dense = residual_jacobian_svd(block, h.double(), 4, method="dense")
    assert result.singular_values.dtype == torch.float64
    assert _relative(result.singular_values, dense.singular_values) < 1e-9


def test_frobenius_estimates():
    fn, matrix, *_ = _known_linear(60)
    h = torch.zeros(60, dtype=torch.float64)
    exact = float(matrix.pow(2).sum())
    generator = torch.Generator().manual_seed(0)
    assert hutchinson_frobenius_sq(fn, h, probes=400, generator=generator) == pytest.approx(exact, rel=0.1)
    sketched = residual_jacobian_svd(fn, h, 4, method="randomized", frobenius_probes=16, generator=generator)
    assert sketched.frobenius_sq == pytest.approx(exact, rel=0.1)
    assert residual_jacobian_svd(fn, h, 4, method="randomized").frobenius_sq is None


def test_matvec_and_rmatvec():
    fn, matrix, *_ = _known_linear(10)
    h = torch.zeros(10, dtype=torch.float64)
    vectors = torch.randn(3, 10, dtype=torch.float64)
    torch.testing.assert_close(jacobian_matvec(fn, h, vectors), vectors @ matrix.T)
    torch.testing.assert_close(jacobian_rmatvec(fn, h, vectors), vectors @ matrix)
    with pytest.raises(ValueError, match="tangents must have shape"):
        jacobian_matvec(fn, h, torch.randn(3, 9, dtype=torch.float64))


def test_fused_attention_needs_the_analysis_context():
    layer = ViTLayer(
        ViTConfig(hidden_size=16, num_attention_heads=2, intermediate_size=32, attn_implementation="sdpa")
    )
    layer.eval()
    h = torch.randn(1, 5, 16)

    def branch(x):
        return layer(x) - x

    with analysis_attention():
        result = residual_jacobian_svd(branch, h, 2, method="randomized")
    assert torch.isfinite(result.singular_values).all()
    assert layer.attention.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(k=0), "k must be an integer >= 1"),
        (dict(k=11), r"k must be in \[1, 10\]"),
        (dict(k=2, method="svd"), "method must be one of"),
        (dict(k=2, dtype=torch.float16), "dtype must be None"),
        (dict(k=2, power_iters=-1), "power_iters must be an integer >= 0"),
        (dict(k=2, oversample=1.5), "oversample must be an integer >= 0"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    fn, *_ = _known_linear(10)
    with pytest.raises(ValueError, match=message):
        residual_jacobian_svd(fn, torch.zeros(10, dtype=torch.float64), **kwargs)
