"""Residual-alignment analysis (arXiv 2401.09018) of a model on a batch: :func:`analyze` builds the report.

For every analysed sample and residual block ``l`` the branch Jacobian ``J_l`` (the skip excluded, see
:mod:`hf_resdecay.alignment.blocks`) is linearised at the block's input and its top singular triplets read
(:func:`~hf_resdecay.alignment.jacobian.residual_jacobian_svd`). From them:

- **RA1**: the sample's representations ``h_0 .. h_L`` lie on a line at equal steps. Line-shape score
  ``L / ||x~_L - x~_0||`` where ``x~`` accumulates the *unit-normalised* steps (1 = straight line, larger =
  bent), the coefficient of variation of the step lengths (0 = equispaced), and the share of the
  trajectory's variance on its first principal component.
- **RA2**: top singular vectors align. Within a Jacobian, ``|<u_i, v_i>|`` (chance level for random unit
  vectors is about ``sqrt(2 / (pi n))``). Across depths, ``M = U_j^T J_i V_j`` (top ``K`` vectors of block
  ``j``, Jacobian of block ``i``, same sample) is nearly diagonal: the fraction of its energy on the diagonal
  (1 for ``i = j``; about ``1/K`` by chance). And the overlap ``||U_i^T U_j||_F^2 / K`` of top-``K`` left
  subspaces.
- **RA3**: the rank of ``J_l`` is at most ``C`` (classes): numerical rank ``#{s_i > threshold * s_1}`` among
  the top ``k``, ``s_{C+1} / s_1``, and the share ``sum_{i<=C} s_i^2 / ||J||_F^2`` of the top ``C`` (the
  Frobenius norm from a Hutchinson estimate on the matrix-free path).
- **RA4**: ``s_1`` scales like ``1 / L``: ``s_1`` per block within a model, and
  :func:`~hf_resdecay.alignment.metrics.depth_scaling` for the log-log slope of ``s_1`` against total depth
  across models.
- **NC1-NC4** at the last analysed block when labels are given (Papyan, Han & Donoho 2020).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .blocks import BlockCapture, ResidualBlock, capture_block_inputs, discover_residual_blocks
from .jacobian import (
    JacobianSVD,
    analysis_attention,
    check_integer,
    jacobian_rmatvec,
    residual_jacobian_svd,
)
from .metrics import neural_collapse, numerical_rank, single_sample_note, trajectory_stats
from .report import AlignmentReport, BlockStats

__all__ = ["analyze"]


def _pooled_features(output: torch.Tensor) -> torch.Tensor:
    """Per-sample feature vectors of a block output: as is (2-D), token mean (3-D), spatial mean (4-D)."""
    if output.ndim == 2:
        return output
    if output.ndim == 3:
        return output.mean(dim=1)
    if output.ndim == 4:
        return output.mean(dim=(2, 3))
    return output.reshape(output.shape[0], -1)


def _longest_chain(captures: Sequence[BlockCapture]) -> tuple[int, int]:
    """Longest run ``[a, b]`` of blocks where each one's input is the previous one's output."""
    best, start = (0, 0), 0
    for index in range(1, len(captures)):
        previous, current = captures[index - 1].output, captures[index].input
        chained = previous.shape == current.shape and torch.equal(previous, current)
        if not chained:
            start = index
        if index - start > best[1] - best[0]:
            best = (start, index)
    return best


def _pca_2d(points: torch.Tensor) -> torch.Tensor:
    """Rows of ``points`` (``(p, d)``) projected on their first two principal components, ``(p, 2)``."""
    centred = points.double() - points.double().mean(0)
    u, s, _ = torch.linalg.svd(centred, full_matrices=False)
    coords = u[:, :2] * s[:2]
    if coords.shape[1] < 2:
        coords = torch.cat([coords, torch.zeros(coords.shape[0], 2 - coords.shape[1], dtype=coords.dtype)], 1)
    return coords


def analyze(
    model: nn.Module,
    inputs: torch.Tensor | Mapping[str, Any],
    labels: torch.Tensor | Sequence[int] | None = None,
    top_k: int = 16,
    *,
    blocks: Sequence[nn.Module] | None = None,
    alphas: Sequence[float] | float | None = None,
    num_classes: int | None = None,
    classifier: nn.Module | None = None,
    rank_threshold: float = 0.1,
    coupling_k: int | None = None,
    coupling_samples: int | None = None,
    method: str = "auto",
    oversample: int = 8,
    power_iters: int = 2,
    frobenius_probes: int = 16,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    chunk_size: int | None = None,
    progress: bool | Any = False,
    model_name: str | None = None,
) -> AlignmentReport:
    """Measure RA1-RA4 (and NC1-NC4 with ``labels``) of ``model`` on a batch of ``inputs``.

    Args:
        model: a transformers / diffusers model or any module (then pass ``blocks``). Put in eval mode for
            the analysis and restored afterwards; attention runs in a forward-differentiable kernel.
        inputs: one batch: a tensor passed positionally (``pixel_values``) or a mapping of keyword inputs
            (a DiT's ``hidden_states``, ``timestep``, ``class_labels``). Every sample in it is analysed.
        labels: integer class of each sample: enables NC metrics and sets ``C`` unless ``num_classes``.
        top_k: singular triplets per Jacobian.
        blocks, alphas: explicit blocks and identity coefficients (see ``discover_residual_blocks``).
        num_classes: ``C`` for RA3 (defaults to the classes in ``labels``, else the classifier's outputs).
        classifier: the module mapping last-block features to logits, for NC3 / NC4.
        rank_threshold: relative threshold of the numerical rank, in ``(0, 1)``.
        coupling_k: ``K``, the number of top vectors in cross-depth products and subspace overlaps
            (default ``min(C, top_k)``, or ``top_k`` when ``C`` is unknown).
        coupling_samples: how many of the samples get cross-depth products (default all; each costs one
            batched vjp of ``num_blocks * K`` vectors per block).
        method, oversample, power_iters, frobenius_probes, dtype, chunk_size: passed to
            :func:`~hf_resdecay.alignment.jacobian.residual_jacobian_svd`.
        seed: seed of the random sketches.
        progress: ``True`` for a tqdm bar over (block, sample) pairs, or a tqdm-like object to update.
        model_name: recorded in the report (defaults to the model's class name or ``name_or_path``).
    """
    top_k = check_integer("top_k", top_k)
    if not 0.0 < rank_threshold < 1.0:
        raise ValueError(f"rank_threshold must be in (0, 1) (relative to s_1); got {rank_threshold!r}")
    discovered = discover_residual_blocks(model, blocks=blocks, alphas=alphas)
    label_tensor = None if labels is None else torch.as_tensor(labels).reshape(-1).long()
    if num_classes is None and label_tensor is not None:
        num_classes = int(torch.unique(label_tensor).numel())
    if num_classes is None and isinstance(getattr(classifier, "out_features", None), int):
        num_classes = classifier.out_features
    if num_classes is not None:
        num_classes = check_integer("num_classes", num_classes)
    if coupling_k is None:
        coupling_k = min(num_classes, top_k) if num_classes else top_k
    coupling_k = check_integer("coupling_k", coupling_k)
    if coupling_k > top_k:
        raise ValueError(f"coupling_k must be in [1, top_k={top_k}]; got {coupling_k}")

    was_training = model.training
    model.eval()
    try:
        with analysis_attention(model):
            captures = capture_block_inputs(model, discovered.blocks, inputs)
            num_samples = captures[0].input.shape[0]
            if label_tensor is not None and label_tensor.shape[0] != num_samples:
                raise ValueError(
                    f"labels must hold one label per sample ({num_samples}); got {label_tensor.shape[0]}"
                )
            if coupling_samples is None:
                coupling_samples = num_samples
            coupling_samples = check_integer("coupling_samples", coupling_samples, 0)
            measured = _analyse_samples(
                captures,
                num_samples,
                top_k=top_k,
                num_classes=num_classes,
                rank_threshold=rank_threshold,
                coupling_k=coupling_k,
                coupling_samples=min(coupling_samples, num_samples),
                svd_kwargs=dict(
                    oversample=oversample,
                    power_iters=power_iters,
                    method=method,
                    frobenius_probes=frobenius_probes,
                    dtype=dtype,
                    chunk_size=chunk_size,
                ),
                seed=seed,
                progress=progress,
            )
    finally:
        model.train(was_training)

    block_stats = [
        _block_stats(capture.block, capture, samples)
        for capture, samples in zip(captures, measured.per_block, strict=True)
    ]
    start, end = _longest_chain(captures)
    points = torch.stack(
        [captures[start].input, *[capture.output for capture in captures[start : end + 1]]], dim=1
    )  # (samples, steps + 1, ...)
    points = points.reshape(points.shape[0], points.shape[1], -1)
    trajectories = [trajectory_stats(points[s]) for s in range(num_samples)]
    ra1: dict[str, Any] = {
        "segment": [captures[start].block.name, captures[end].block.name],
        "segment_blocks": end - start + 1,
    }
    for key in ("line_shape", "step_cv", "pc1_share"):
        values = [t[key] for t in trajectories]
        ra1[key] = _nanmean(values)
        ra1[f"{key}_per_sample"] = values
    shared = _pca_2d(points.reshape(-1, points.shape[-1])).reshape(num_samples, points.shape[1], 2)
    nc, notes = None, []
    if label_tensor is not None:
        nc = neural_collapse(_pooled_features(captures[-1].output), label_tensor, classifier)
        note = single_sample_note(label_tensor)
        if note is not None:
            notes.append(note)
    name = model_name or getattr(getattr(model, "config", None), "name_or_path", None) or type(model).__name__
    return AlignmentReport(
        model=str(name),
        num_samples=num_samples,
        top_k=top_k,
        num_classes=num_classes,
        rank_threshold=rank_threshold,
        coupling_k=coupling_k,
        settings=dict(
            method=method,
            oversample=oversample,
            power_iters=power_iters,
            frobenius_probes=frobenius_probes,
            dtype=str(dtype or captures[0].input.dtype).replace("torch.", ""),
            coupling_samples=coupling_samples,
            seed=seed,
        ),
        blocks=block_stats,
        skipped=[asdict(skipped) for skipped in discovered.skipped],
        coupling_diag_fraction=measured.coupling,
        subspace_overlap=measured.overlap,
        ra1=ra1,
        neural_collapse=nc,
        labels=None if label_tensor is None else label_tensor.tolist(),
        trajectory_pca=shared.tolist(),
        sample_trajectory_pca=_pca_2d(points[0]).tolist(),
        notes=notes,
    )


def _nanmean(values: Sequence[float]) -> float:
    kept = [value for value in values if not math.isnan(value)]
    return sum(kept) / len(kept) if kept else float("nan")


def _sample_stats(
    svd: JacobianSVD, top_k: int, num_classes: int | None, rank_threshold: float
) -> dict[str, Any]:
    s = svd.singular_values.double()
    rank = numerical_rank(s, rank_threshold)
    ratio = energy = None
    if num_classes is not None and num_classes < s.numel() and s[0] > 0:
        ratio = float(s[num_classes] / s[0])
    if num_classes is not None and svd.frobenius_sq:
        energy = min(1.0, float(s[:num_classes].pow(2).sum() / svd.frobenius_sq))
    alignment = (
        (svd.left.double() * svd.right.double()).sum(0).abs() if svd.left.shape == svd.right.shape else None
    )
    return {
        "s": s,
        "rank": rank,
        "saturated": rank >= top_k,
        "ratio": ratio,
        "energy": energy,
        "fro": svd.frobenius_sq,
        "alignment": alignment,
        "method": svd.method,
    }


@dataclass
class _SampleMeasures:
    """What :func:`_analyse_samples` measured, before averaging into :class:`BlockStats`."""

    per_block: list[list[dict[str, Any]]]
    """``[block][sample]``: that sample's statistics of the block's Jacobian (see :func:`_sample_stats`)."""
    coupling: list[list[float | None]]
    """``[i][j]``: mean diagonal energy fraction of ``U_j^T J_i V_j`` over the coupling samples."""
    overlap: list[list[float | None]]
    """``[i][j]``: mean top-``K`` left subspace overlap over all samples."""


def _analyse_samples(
    captures: Sequence[BlockCapture],
    num_samples: int,
    *,
    top_k: int,
    num_classes: int | None,
    rank_threshold: float,
    coupling_k: int,
    coupling_samples: int,
    svd_kwargs: dict[str, Any],
    seed: int,
    progress: bool | Any,
) -> _SampleMeasures:
    """SVDs of every (block, sample), then cross-depth products per sample; returns the raw measures."""
    num_blocks = len(captures)
    for capture in captures:
        dim = capture.input[0].numel()
        if top_k > dim:
            raise ValueError(f"top_k must be in [1, {dim}] (block {capture.block.name} has {dim} inputs)")
    bar, own_bar = _progress(progress, num_blocks * num_samples)
    stats: list[list[dict[str, Any]]] = [[] for _ in range(num_blocks)]
    coupling_sum = [[0.0] * num_blocks for _ in range(num_blocks)]
    overlap_sum = [[0.0] * num_blocks for _ in range(num_blocks)]
    generator = torch.Generator().manual_seed(seed)
    dtype = svd_kwargs.get("dtype")
    try:
        for sample in range(num_samples):
            functions, points, svds = [], [], []
            for capture in captures:
                h, args, kwargs = capture.sample(sample)
                fn = capture.block.branch(h, args, kwargs, dtype=dtype)
                if dtype is not None:
                    h = h.to(dtype)
                svd = residual_jacobian_svd(fn, h, top_k, generator=generator, **svd_kwargs)
                stats[len(functions)].append(_sample_stats(svd, top_k, num_classes, rank_threshold))
                functions.append(fn)
                points.append(h)
                svds.append(svd)
                if bar is not None:
                    bar.update(1)
            for i in range(num_blocks):
                for j in range(num_blocks):
                    overlap_sum[i][j] += _overlap(svds[i], svds[j], coupling_k)
            if sample < coupling_samples:
                for i in range(num_blocks):
                    row = _coupling_row(
                        functions[i], points[i], svds, i, coupling_k, svd_kwargs.get("chunk_size")
                    )
                    for j, value in enumerate(row):
                        coupling_sum[i][j] += value
    finally:
        if own_bar:
            bar.close()

    def average(matrix: list[list[float]], count: int) -> list[list[float | None]]:
        return [
            [None if math.isnan(value) or count == 0 else value / count for value in row] for row in matrix
        ]

    return _SampleMeasures(stats, average(coupling_sum, coupling_samples), average(overlap_sum, num_samples))


def _overlap(first: JacobianSVD, second: JacobianSVD, k: int) -> float:
    if first.left.shape[0] != second.left.shape[0]:
        return float("nan")
    product = first.left[:, :k].double().T @ second.left[:, :k].double()
    return float(product.pow(2).sum() / k)


def _coupling_row(
    fn, h: torch.Tensor, svds: Sequence[JacobianSVD], i: int, k: int, chunk_size: int | None
) -> list[float]:
    """Diagonal energy fraction of ``U_j^T J_i V_j`` for every block ``j`` (NaN where shapes differ)."""
    matching = [j for j, svd in enumerate(svds) if svd.left.shape[0] == svds[i].left.shape[0]]
    if svds[i].dense is not None:
        jacobian = svds[i].dense.double()
        rows = {j: svds[j].left[:, :k].double().T @ jacobian for j in matching}
    else:
        cotangents = torch.cat([svds[j].left[:, :k].T for j in matching]).to(h.dtype)
        products = jacobian_rmatvec(fn, h, cotangents, chunk_size).double()
        rows = {j: products[index * k : (index + 1) * k] for index, j in enumerate(matching)}
    result = [float("nan")] * len(svds)
    for j, row in rows.items():
        matrix = row @ svds[j].right[:, :k].double()  # U_j^T J_i V_j
        total = matrix.pow(2).sum()
        result[j] = float(torch.diagonal(matrix).pow(2).sum() / total) if total > 0 else float("nan")
    return result


def _block_stats(block: ResidualBlock, capture: BlockCapture, samples: list[dict[str, Any]]) -> BlockStats:
    values = torch.stack([sample["s"] for sample in samples])
    alignments = [sample["alignment"] for sample in samples if sample["alignment"] is not None]
    alignment = torch.stack(alignments).mean(0).tolist() if alignments else []

    def mean_of(key: str) -> float | None:
        kept = [sample[key] for sample in samples if sample[key] is not None]
        return sum(kept) / len(kept) if kept else None

    return BlockStats(
        name=block.name,
        family=block.family,
        kind=block.kind,
        alpha=block.alpha,
        sublayer_alphas=list(block.sublayer_alphas),
        dim=capture.input[0].numel(),
        method=samples[0]["method"],
        singular_values=values.mean(0).tolist(),
        singular_values_std=values.std(0, unbiased=False).tolist(),
        alignment=alignment,
        numerical_rank=float(sum(sample["rank"] for sample in samples) / len(samples)),
        rank_saturated=float(sum(sample["saturated"] for sample in samples) / len(samples)),
        ratio_after_c=mean_of("ratio"),
        energy_top_c=mean_of("energy"),
        frobenius_sq=mean_of("fro"),
    )


def _progress(progress: bool | Any, total: int) -> tuple[Any, bool]:
    """``(bar, owned)``: a new tqdm bar for ``progress=True``, the caller's object, or ``None``."""
    if progress is True:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="residual Jacobians (block x sample)", unit="jac"), True
    if progress:
        return progress, False
    return None, False
