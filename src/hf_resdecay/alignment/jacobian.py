"""Top singular triplets of a residual branch's Jacobian, without forming the Jacobian.

A ViT-B block's Jacobian over the full sequence is 151,296 x 151,296 (92 GB in float32), so the analysis
reads it only through Jacobian-vector products (forward mode, ``torch.func.jvp``) and vector-Jacobian
products (reverse mode, ``torch.func.vjp``), each batched over many tangents with ``torch.func.vmap``,
and runs a randomized SVD with power iterations (Halko, Martinsson & Tropp 2011) on top of them. Small
Jacobians (the fully-connected ResNets of the residual-alignment paper) are formed densely instead, which
is both exact and faster there.

Fused attention kernels have no forward-mode derivative; run the products inside
:func:`analysis_attention` (or with eager attention).
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import jacfwd, jacrev, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = [
    "JacobianSVD",
    "analysis_attention",
    "dense_jacobian_bytes",
    "hutchinson_frobenius_sq",
    "jacobian_matvec",
    "jacobian_rmatvec",
    "residual_jacobian_svd",
]

METHODS = ("auto", "dense", "randomized")
"""Values accepted by ``method``: ``"auto"`` is dense up to ``dense_max_dim`` inputs/outputs."""

_DTYPES = (None, torch.float32, torch.float64)


@dataclass
class JacobianSVD:
    """Top-``k`` singular triplets of a Jacobian ``J`` (``m`` outputs by ``n`` inputs, both flattened).

    ``J right[:, i] = singular_values[i] * left[:, i]`` and ``J^T left[:, i] = singular_values[i] *
    right[:, i]``: the two vectors of a triplet carry consistent signs, so ``<u_i, v_i>`` and
    ``U_j^T J V_j`` are meaningful, not only their absolute values.
    """

    singular_values: torch.Tensor
    """``(k,)``, descending."""
    left: torch.Tensor
    """``U``, ``(m, k)``, orthonormal columns (output space)."""
    right: torch.Tensor
    """``V``, ``(n, k)``, orthonormal columns (input space)."""
    frobenius_sq: float | None
    """``||J||_F^2``: exact on the dense path, an unbiased estimate on the randomized path when
    ``frobenius_probes > 0`` (the exact energy captured by the sketch plus a Hutchinson estimate of the
    rest), else ``None``."""
    method: str
    """``"dense"`` or ``"randomized"``: the path that ran."""
    dense: torch.Tensor | None = None
    """The full ``(m, n)`` Jacobian when the dense path ran (reused for cross-depth products)."""


@contextlib.contextmanager
def analysis_attention(model: nn.Module | None = None) -> Iterator[None]:
    """Make attention differentiable in forward mode for the duration of the block.

    Selects PyTorch's math SDPA kernel (the fused CPU/GPU kernels have no forward-mode derivative) and, for
    a transformers model using another attention implementation than ``"eager"`` or ``"sdpa"`` (flash,
    flex, kernels), switches it to ``"eager"``; the model's implementation is restored on exit.
    """
    previous = None
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if (
        model is not None
        and current not in (None, "eager", "sdpa")
        and hasattr(model, "set_attn_implementation")
    ):
        previous = current
        model.set_attn_implementation("eager")
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        if previous is not None:
            model.set_attn_implementation(previous)


def check_integer(name: str, value: object, minimum: int = 1) -> int:
    """``value`` as an ``int`` when it is an integer (not a bool) ``>= minimum``; ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def _batched_jvp(
    fn: Callable[[torch.Tensor], torch.Tensor],
    h: torch.Tensor,
    tangents: torch.Tensor,
    chunk_size: int | None,
) -> torch.Tensor:
    """``J t`` for each row ``t`` of ``tangents`` (``(p, n)``); returns ``(p, m)``."""

    def one(tangent: torch.Tensor) -> torch.Tensor:
        return jvp(fn, (h,), (tangent.reshape(h.shape),))[1].reshape(-1)

    return vmap(one, chunk_size=chunk_size)(tangents)


def _batched_vjp(
    vjp_fn: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
    out_shape: torch.Size,
    cotangents: torch.Tensor,
    chunk_size: int | None,
) -> torch.Tensor:
    """``J^T c`` for each row ``c`` of ``cotangents`` (``(p, m)``); returns ``(p, n)``."""

    def one(cotangent: torch.Tensor) -> torch.Tensor:
        return vjp_fn(cotangent.reshape(out_shape))[0].reshape(-1)

    return vmap(one, chunk_size=chunk_size)(cotangents)


def jacobian_matvec(
    fn: Callable[[torch.Tensor], torch.Tensor],
    h: torch.Tensor,
    tangents: torch.Tensor,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``J(h) t`` for every row of ``tangents`` (``(p, n)``, flattened inputs), as ``(p, m)``.

    Matrix-free (batched forward-mode products): used for cross-depth products ``J_i V_j``.
    """
    if tangents.ndim != 2 or tangents.shape[1] != h.numel():
        raise ValueError(
            f"tangents must have shape (p, {h.numel()}) (flattened inputs of h); got {tuple(tangents.shape)}"
        )
    with torch.no_grad():
        return _batched_jvp(fn, h.detach(), tangents.to(h.dtype), chunk_size)


def jacobian_rmatvec(
    fn: Callable[[torch.Tensor], torch.Tensor],
    h: torch.Tensor,
    cotangents: torch.Tensor,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``J(h)^T c`` for every row of ``cotangents`` (``(p, m)``, flattened outputs), as ``(p, n)``.

    Matrix-free (batched reverse-mode products, one forward pass): used for cross-depth products
    ``U_j^T J_i``, cheaper than the forward-mode equivalent on CPU.
    """
    with torch.no_grad():
        output, vjp_fn = vjp(fn, h.detach())
        if cotangents.ndim != 2 or cotangents.shape[1] != output.numel():
            raise ValueError(
                f"cotangents must have shape (p, {output.numel()}) (flattened outputs); "
                f"got {tuple(cotangents.shape)}"
            )
        return _batched_vjp(vjp_fn, output.shape, cotangents.to(h.dtype), chunk_size)


def _orthonormal_rows(rows: torch.Tensor, against: torch.Tensor | None = None) -> torch.Tensor:
    """Orthonormal float64 rows spanning ``rows`` (``(p, d)``) with the span of ``against`` removed.

    Classical Gram-Schmidt against the earlier basis, twice (enough to keep float32 products orthogonal
    to working precision), then a QR of the remainder.
    """
    rows = rows.double()
    if against is not None:
        for _ in range(2):
            rows = rows - (rows @ against.T) @ against
    q, _ = torch.linalg.qr(rows.T)
    return q.T


def _rademacher(count: int, dim: int, dtype: torch.dtype, device: torch.device, generator) -> torch.Tensor:
    signs = torch.randint(0, 2, (count, dim), generator=generator, device="cpu").to(
        device=device, dtype=dtype
    )
    return signs.mul_(2).sub_(1)


def hutchinson_frobenius_sq(
    fn: Callable[[torch.Tensor], torch.Tensor],
    h: torch.Tensor,
    probes: int = 32,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> float:
    """Unbiased estimate of ``||J(h)||_F^2 = E ||J z||^2`` over Rademacher probes ``z`` (Hutchinson)."""
    probes = check_integer("probes", probes, 1)
    z = _rademacher(probes, h.numel(), h.dtype, h.device, generator)
    with torch.no_grad():
        return float(_batched_jvp(fn, h.detach(), z, chunk_size).double().pow(2).sum() / probes)


def _dense(
    fn: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, k: int, chunk_size: int | None
) -> JacobianSVD:
    """Form ``J`` (forward mode when it has fewer inputs than outputs), then a full SVD in float64."""
    out_numel = fn(h).numel()
    if h.numel() <= out_numel:
        jacobian = jacfwd(fn, randomness="same")(h)
    else:
        jacobian = jacrev(fn, chunk_size=chunk_size)(h)
    jacobian = jacobian.reshape(out_numel, h.numel())
    u, s, vh = torch.linalg.svd(jacobian.double(), full_matrices=False)
    return JacobianSVD(
        singular_values=s[:k].to(h.dtype),
        left=u[:, :k].to(h.dtype),
        right=vh[:k].T.to(h.dtype),
        frobenius_sq=float(s.pow(2).sum()),
        method="dense",
        dense=jacobian,
    )


def _randomized(
    fn: Callable[[torch.Tensor], torch.Tensor],
    h: torch.Tensor,
    k: int,
    oversample: int,
    power_iters: int,
    frobenius_probes: int,
    generator: torch.Generator | None,
    chunk_size: int | None,
) -> JacobianSVD:
    """Randomized block-Krylov SVD of ``J`` read through batched jvp / vjp products.

    The basis ``K = [Q_0, .., Q_q]`` spans ``J Omega, (J J^T) J Omega, ..`` (Rademacher ``Omega`` of
    ``k + oversample`` columns, ``q = power_iters``); the vjps ``J^T Q_i`` that extend it are exactly the
    rows of ``B = K^T J``, so keeping the whole Krylov space costs no more products than plain subspace
    iteration (``q + 1`` batched jvps and ``q + 1`` batched vjps) and converges much faster where the
    spectrum is flat (Musco & Musco 2015). The SVD ``B = W S V^T`` gives ``U = K W`` and ``V`` with
    ``J^T U = V S`` exactly, so the pairs' signs match.
    """
    output, vjp_fn = vjp(fn, h)
    out_shape, n, m = output.shape, h.numel(), output.numel()
    width = min(k + oversample, m, n)
    omega = _rademacher(width, n, h.dtype, h.device, generator)
    blocks = [_orthonormal_rows(_batched_jvp(fn, h, omega, chunk_size))]
    rows = []  # rows[i] = (J^T blocks[i])^T
    for _ in range(power_iters):
        basis = torch.cat(blocks)
        room = min(m, n) - basis.shape[0]
        if room <= 0:
            break
        transposed = _batched_vjp(vjp_fn, out_shape, blocks[-1].to(h.dtype), chunk_size)
        rows.append(transposed.double())
        extension = _batched_jvp(fn, h, _orthonormal_rows(transposed).to(h.dtype), chunk_size)
        blocks.append(_orthonormal_rows(extension, against=basis)[:room])
    basis = torch.cat(blocks)
    if len(rows) < len(blocks):
        rows.append(_batched_vjp(vjp_fn, out_shape, blocks[-1].to(h.dtype), chunk_size).double())
    b = torch.cat(rows)  # row i is basis_i^T J, so b is B = K^T J
    w, s, vh = torch.linalg.svd(b, full_matrices=False)
    left = (basis.T @ w[:, :k]).to(h.dtype)
    right = vh[:k].T.to(h.dtype)
    frobenius_sq = None
    if frobenius_probes:
        probes = _rademacher(frobenius_probes, n, h.dtype, h.device, generator)
        jz = _batched_jvp(fn, h, probes, chunk_size).double()
        residual = jz - (jz @ basis.T) @ basis
        frobenius_sq = float(b.pow(2).sum() + residual.pow(2).sum() / frobenius_probes)
    return JacobianSVD(
        singular_values=s[:k].to(h.dtype),
        left=left,
        right=right,
        frobenius_sq=frobenius_sq,
        method="randomized",
    )


def residual_jacobian_svd(
    fn: Callable[[torch.Tensor], torch.Tensor],
    h: torch.Tensor,
    k: int,
    *,
    oversample: int = 8,
    power_iters: int = 2,
    dtype: torch.dtype | None = None,
    method: str = "auto",
    dense_max_dim: int = 2048,
    frobenius_probes: int = 0,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> JacobianSVD:
    """Top-``k`` singular values and paired singular vectors of ``J = d fn / d h`` at ``h``.

    Args:
        fn: the residual branch, a function of one tensor (any shape; inputs and outputs are flattened).
            It must compute in ``h``'s dtype; :meth:`ResidualBlock.branch` builds such functions.
        h: the point of linearisation (one sample, including any batch dimension of size 1 the model needs).
        k: how many triplets, ``1 <= k <= min(m, n)``.
        oversample: extra sketch columns of the randomized path (accuracy grows with it).
        power_iters: block-Krylov (power) iterations of the randomized path; each costs one batched jvp and
            one batched vjp of ``k + oversample`` vectors and sharpens the result where the spectrum is flat.
        dtype: ``torch.float32`` or ``torch.float64`` to cast ``h`` to; ``None`` keeps ``h``'s dtype.
        method: ``"dense"`` forms the Jacobian (``jacfwd``/``jacrev``) and runs a full SVD; ``"randomized"``
            never forms it; ``"auto"`` is dense when both ``m`` and ``n`` are at most ``dense_max_dim``.
        frobenius_probes: Hutchinson probes spent on ``||J||_F^2`` on the randomized path (0: skip).
        generator: random source of the sketch and probes (reproducible runs).
        chunk_size: passed to ``vmap``: bounds how many tangents run at once (memory).

    Returns:
        A :class:`JacobianSVD`; its vectors are flattened over the shapes of ``fn(h)`` and ``h``.
    """
    if not isinstance(h, torch.Tensor) or not h.is_floating_point():
        raise ValueError(f"h must be a floating-point tensor; got {type(h).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be None, torch.float32 or torch.float64; got {dtype!r}")
    k = check_integer("k", k, 1)
    oversample = check_integer("oversample", oversample, 0)
    power_iters = check_integer("power_iters", power_iters, 0)
    dense_max_dim = check_integer("dense_max_dim", dense_max_dim, 1)
    frobenius_probes = check_integer("frobenius_probes", frobenius_probes, 0)
    if dtype is not None:
        h = h.to(dtype)
    h = h.detach()
    with torch.no_grad():
        out_numel = fn(h).numel()
    if k > min(out_numel, h.numel()):
        raise ValueError(
            f"k must be in [1, {min(out_numel, h.numel())}] (the smaller Jacobian dimension); got {k}"
        )
    if method == "auto":
        method = "dense" if max(out_numel, h.numel()) <= dense_max_dim else "randomized"
    with torch.no_grad():  # torch.func transforms still differentiate; this only skips parameter graphs
        if method == "dense":
            return _dense(fn, h, k, chunk_size)
        return _randomized(fn, h, k, oversample, power_iters, frobenius_probes, generator, chunk_size)


def dense_jacobian_bytes(m: int, n: int, dtype: torch.dtype = torch.float32) -> int:
    """Memory the dense path needs for the Jacobian alone (the SVD needs about as much again, in float64)."""
    return m * n * torch.empty((), dtype=dtype).element_size()
