import json
import math
import warnings

import pytest
import torch
from torch import nn

from hf_resdecay.alignment import (
    AlignmentReport,
    analyze,
    depth_scaling,
    line_shape,
    neural_collapse,
    numerical_rank,
    trajectory_stats,
)

from .helpers import LinearResNet, orthogonal

N = 12
SPECTRUM = torch.tensor([4.0, 3.0, 2.0] + [1e-3 * (9 - i) for i in range(9)], dtype=torch.float64)
"""Rank-3-like spectrum: C = 3 large values, then a floor 1000x smaller."""


def _matrices(shared: bool, scales=(1.0, 0.5, 0.25)):
    """``A_l = scale_l * Q diag(SPECTRUM) Q^T`` (aligned: u_i = v_i, same basis at every depth); with
    ``shared=False`` the last block becomes ``P diag(SPECTRUM) R^T`` with unrelated P, R."""
    q = orthogonal(N, 0)
    matrices = [scale * q @ torch.diag(SPECTRUM) @ q.T for scale in scales]
    if not shared:
        p, r = orthogonal(N, 1), orthogonal(N, 2)
        matrices[-1] = scales[-1] * p @ torch.diag(SPECTRUM) @ r.T
    return [m.float() for m in matrices]


def _inputs(count: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(count, N, generator=torch.Generator().manual_seed(5))
    return x, torch.arange(count) % 3


@pytest.mark.parametrize("method", ["dense", "randomized"])
def test_aligned_linear_blocks_match_hand_computed_diagnostics(method):
    matrices = _matrices(shared=True)
    model = LinearResNet(matrices)
    x, labels = _inputs()
    report = analyze(
        model,
        x,
        labels,
        blocks=list(model.blocks),
        top_k=5,
        method=method,
        power_iters=3,
        frobenius_probes=64,
        seed=1,
    )
    assert report.num_blocks == 3 and report.num_classes == 3 and report.coupling_k == 3
    for scale, block in zip((1.0, 0.5, 0.25), report.blocks, strict=True):
        assert block.method == method
        assert block.singular_values == pytest.approx((scale * SPECTRUM[:5]).tolist(), rel=1e-4)
        assert block.alignment[:3] == pytest.approx([1.0, 1.0, 1.0], abs=1e-4)  # u_i = v_i
        assert block.numerical_rank == 3 and block.rank_saturated == 0.0
        assert block.ratio_after_c == pytest.approx(float(SPECTRUM[3] / SPECTRUM[0]), rel=1e-3)
        energy = float(SPECTRUM[:3].pow(2).sum() / SPECTRUM.pow(2).sum())
        assert block.energy_top_c == pytest.approx(energy, rel=1e-3 if method == "dense" else 1e-2)
    for row in report.coupling_diag_fraction + report.subspace_overlap:
        assert row == pytest.approx([1.0, 1.0, 1.0], abs=1e-4)
    assert report.s1 == pytest.approx([4.0, 2.0, 1.0], rel=1e-4)


def test_unaligned_block_matches_hand_computed_alignment_and_coupling():
    matrices = _matrices(shared=False)
    model = LinearResNet(matrices)
    x, labels = _inputs()
    report = analyze(model, x, labels, blocks=list(model.blocks), top_k=5)
    p, r = orthogonal(N, 1), orthogonal(N, 2)
    expected_alignment = (p[:, :3] * r[:, :3]).sum(0).abs()
    assert report.blocks[2].alignment[:3] == pytest.approx(expected_alignment.tolist(), abs=1e-4)
    # Block 2's singular vectors through block 0's Jacobian: M = P_3^T A_0 R_3.
    m = p[:, :3].T @ matrices[0].double() @ r[:, :3]
    expected = float(torch.diagonal(m).pow(2).sum() / m.pow(2).sum())
    assert report.coupling_diag_fraction[0][2] == pytest.approx(expected, abs=1e-4)
    assert expected < 0.9  # the hand case is far from diagonal, so the check can fail
    q = orthogonal(N, 0)
    expected_overlap = float((q[:, :3].T @ p[:, :3]).pow(2).sum() / 3)
    assert report.subspace_overlap[0][2] == pytest.approx(expected_overlap, abs=1e-4)
    assert report.subspace_overlap[2][0] == pytest.approx(expected_overlap, abs=1e-4)
    summary = report.summary()
    assert summary["ra2_coupling_diag"] < 1.0 and summary["ra2_coupling_chance"] == pytest.approx(1 / 3)


def test_ra1_trajectory_matches_hand_computation():
    matrices = _matrices(shared=True)
    model = LinearResNet(matrices)
    x, labels = _inputs()
    report = analyze(model, x, labels, blocks=list(model.blocks), top_k=3)
    points = [x[1].double()]
    for matrix in matrices:
        points.append(points[-1] + matrix.double() @ points[-1])
    expected = trajectory_stats(torch.stack(points))
    assert report.ra1["line_shape_per_sample"][1] == pytest.approx(expected["line_shape"], rel=1e-5)
    assert report.ra1["step_cv_per_sample"][1] == pytest.approx(expected["step_cv"], rel=1e-5)
    assert report.ra1["pc1_share_per_sample"][1] == pytest.approx(expected["pc1_share"], rel=1e-5)
    assert report.ra1["segment_blocks"] == 3
    assert len(report.trajectory_pca) == 6 and len(report.trajectory_pca[0]) == 4


def test_trajectory_metrics_by_hand():
    straight = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    stats = trajectory_stats(straight)
    assert stats == pytest.approx({"line_shape": 1.0, "step_cv": 0.0, "pc1_share": 1.0})
    corner = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    assert line_shape(corner) == pytest.approx(math.sqrt(2))
    uneven = torch.tensor([[0.0], [1.0], [4.0]])  # steps 1 and 3: std 1, mean 2
    assert trajectory_stats(uneven)["step_cv"] == pytest.approx(0.5)
    assert math.isinf(line_shape(torch.tensor([[0.0], [1.0], [0.0]])))


def test_numerical_rank():
    values = torch.tensor([2.0, 1.0, 0.3, 0.19, 0.0])
    assert numerical_rank(values, 0.1) == 3
    assert numerical_rank(values, 0.4) == 2
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\)"):
        numerical_rank(values, 1.0)


def test_neural_collapse_on_a_simplex_etf_is_zero():
    angles = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3])
    means = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    classifier = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        classifier.weight.copy_(2 * means)
    result = neural_collapse(means[labels], labels, classifier)
    for key in ("nc1", "nc2_equinorm", "nc2_equiangular", "nc3_self_duality", "nc4_ncc_mismatch"):
        assert result[key] == pytest.approx(0.0, abs=1e-6), key


def test_neural_collapse_by_hand():
    features = torch.tensor([[-2.0], [0.0], [1.0], [3.0]])
    labels = torch.tensor([0, 0, 1, 1])
    classifier = nn.Linear(1, 2)
    with torch.no_grad():
        classifier.weight.copy_(torch.tensor([[-1.0], [2.0]]))
        classifier.bias.copy_(torch.tensor([0.0, 1.5]))
    result = neural_collapse(features, labels, classifier)
    assert result["nc1"] == pytest.approx((1.0 / 2.25) / 2)  # Sigma_W = 1, Sigma_B = 2.25
    assert result["nc2_equinorm"] == pytest.approx(0.0) and result["nc2_equiangular"] == pytest.approx(0.0)
    expected_nc3 = (
        torch.tensor([-1.0, 2.0]) / math.sqrt(5) - torch.tensor([-1.0, 1.0]) / math.sqrt(2)
    ).norm()
    assert result["nc3_self_duality"] == pytest.approx(float(expected_nc3))
    assert result["nc4_ncc_mismatch"] == pytest.approx(0.25)  # x = 0: classifier says 1, nearest mean 0
    collapsed = neural_collapse(torch.zeros(4, 3), labels)
    assert math.isnan(collapsed["nc1"])
    with pytest.raises(ValueError, match="at least two classes"):
        neural_collapse(features, torch.zeros(4))


def test_nc1_from_single_sample_classes_warns_and_is_not_zero():
    features = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.warns(UserWarning, match="NC1 is undefined: 3 of 3 classes have a single sample"):
        one_each = neural_collapse(features[:3], torch.tensor([0, 1, 2]))
    assert math.isnan(one_each["nc1"]) and one_each["min_samples_per_class"] == 1  # the formula gives 0

    labels = torch.tensor([0, 0, 1, 1, 2])  # class 2 alone: its spread is missing from Sigma_W
    with pytest.warns(UserWarning, match=r"NC1 is unreliable \(biased towards 0\): 1 of 3 classes"):
        some = neural_collapse(features, labels)
    assert math.isfinite(some["nc1"]) and some["min_samples_per_class"] == 1

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # two samples in every class: no warning
        enough = neural_collapse(features[:4], labels[:4])
    assert math.isfinite(enough["nc1"]) and enough["min_samples_per_class"] == 2


def test_report_notes_nc1_from_single_sample_classes(tmp_path):
    model = LinearResNet(_matrices(shared=True))
    x, _ = _inputs(3)
    with pytest.warns(UserWarning, match="NC1 is undefined"):
        report = analyze(model, x, torch.tensor([0, 1, 2]), blocks=list(model.blocks), top_k=3)
    assert report.notes == [
        "NC1 is undefined: 3 of 3 classes have a single sample, and within-class variability needs at least "
        "2 per class; analyse more samples"
    ]
    data = json.loads(report.save_json(tmp_path / "report.json").read_text())
    assert data["notes"] == report.notes and data["summary"]["nc1"] is None
    assert AlignmentReport.load_json(tmp_path / "report.json").notes == report.notes
    x, labels = _inputs(6)
    assert analyze(model, x, labels, blocks=list(model.blocks), top_k=3).notes == []


def test_depth_scaling_recovers_inverse_depth():
    q = orthogonal(N, 0)
    reports = []
    x, labels = _inputs(4)
    for depth in (2, 4, 8):
        matrices = [(q @ torch.diag(SPECTRUM / depth) @ q.T).float() for _ in range(depth)]
        model = LinearResNet(matrices)
        reports.append(analyze(model, x, labels, blocks=list(model.blocks), top_k=3))
    fit = depth_scaling(reports)
    assert fit.depths == [2, 4, 8]
    assert fit.slope == pytest.approx(-1.0, abs=1e-4) and fit.r2 == pytest.approx(1.0, abs=1e-6)
    assert reports[1].summary()["ra4_s1_times_depth"] == pytest.approx(4.0, rel=1e-4)
    with pytest.raises(ValueError, match="at least 2 different depths"):
        depth_scaling([reports[0], reports[0]])


def test_report_json_round_trip_is_atomic_and_strict(tmp_path):
    model = LinearResNet(_matrices(shared=True))
    x, labels = _inputs()
    report = analyze(model, x, labels, blocks=list(model.blocks), top_k=4, classifier=model.head)
    report.ra1["line_shape"] = float("nan")
    path = report.save_json(tmp_path / "out" / "report.json")
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.json"]  # no temporary file left
    data = json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"non-JSON constant {name}"))
    assert data["ra1"]["line_shape"] is None
    assert data["summary"]["ra3_numerical_rank"] == 3.0
    assert data["neural_collapse"]["nc4_ncc_mismatch"] is not None
    loaded = AlignmentReport.load_json(path)
    assert loaded.blocks == report.blocks and loaded.coupling_diag_fraction == report.coupling_diag_fraction


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(rank_threshold=1.5), r"rank_threshold must be in \(0, 1\)"),
        (dict(top_k=13), r"top_k must be in \[1, 12\]"),
        (dict(top_k=0), "top_k must be an integer >= 1"),
        (dict(top_k=2, coupling_k=3), r"coupling_k must be in \[1, top_k=2\]"),
        (dict(labels=torch.tensor([0, 1])), r"labels must hold one label per sample \(6\)"),
    ],
)
def test_analyze_rejects_bad_arguments(kwargs, message):
    model = LinearResNet(_matrices(shared=True))
    x, labels = _inputs()
    kwargs = {"labels": labels, **kwargs}
    with pytest.raises(ValueError, match=message):
        analyze(model, x, blocks=list(model.blocks), **kwargs)
