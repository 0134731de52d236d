"""The FC-ResNet reproduction example, shrunk: residual alignment with skips, none at initialisation."""

import importlib.util
import sys
from pathlib import Path

import pytest
from PIL import Image

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "residual_alignment_fc_resnet.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("residual_alignment_fc_resnet", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def results(example):
    """Depths 2 and 4 with the paper's recipe for 200 epochs (about 15 s): with skips trained and untrained,
    and without skips at depth 2. (At 100 epochs weight decay has not yet lowered the rank.)"""
    runs = example.run_experiments(depths=(2, 4), epochs=200, samples=30, variants=("yes", "untrained"))
    runs += example.run_experiments(depths=(2,), epochs=200, samples=30, variants=("no",))
    return {(result.depth, result.skips): result for result in runs}


def test_residual_alignment_appears_with_skips(example, results):
    c = example.NUM_CLASSES
    for depth in (2, 4):
        trained, untrained = results[depth, "yes"], results[depth, "untrained"]
        assert trained.train_acc > 95 and trained.test_acc > 90 and untrained.test_acc < 40
        ours, chance = trained.report.summary(), untrained.report.summary()
        # RA3: rank at most about C (top-k = 16 > C), while a random network's Jacobians fill all 16.
        assert example.median_rank(trained.report) <= c + 1
        assert example.median_rank(untrained.report) == 16
        assert ours["ra3_energy_top_c"] > 0.85 > 0.6 > chance["ra3_energy_top_c"]
        # RA2: top singular vectors aligned within and across depths; chance level at initialisation.
        assert ours["ra2_alignment_top1"] > 0.6 and chance["ra2_alignment_top1"] < 0.2
        assert ours["ra2_alignment_top_k"] > 3 * chance["ra2_alignment_top_k"]
        assert ours["ra2_coupling_diag"] > 0.6 > 0.25 > chance["ra2_coupling_diag"]
    # RA4: deeper trained ResNets have smaller top singular values; the random ones do not.
    assert (
        results[4, "yes"].report.summary()["ra4_s1_mean"]
        < 0.85 * results[2, "yes"].report.summary()["ra4_s1_mean"]
    )
    # Without skips the network trains, but its Jacobians' singular vectors do not align.
    plain = results[2, "no"]
    assert plain.test_acc > 90 and plain.report.summary()["ra2_alignment_top1"] < 0.3


def test_tables_and_outputs(example, results, tmp_path):
    runs = list(results.values())
    table = example.results_table(runs).splitlines()
    assert len(table) == 2 + len(runs) and table[0].startswith("| depth | skips | train acc | test acc |")
    assert "| 4 | yes |" in "\n".join(table)
    scaling = example.depth_scaling_table(runs).splitlines()
    assert [line.split(" | ")[0] for line in scaling[2:]] == ["| yes", "| untrained"]  # "no": one depth only
    slope = float(scaling[2].split(" | ")[3])
    assert slope < -0.2
    paths = example.save_outputs(runs, tmp_path)
    assert {path.name for path in paths} >= {"report.json", "s1_per_block.png", "depth_scaling.png"}
    for name in ("s1_per_block.png", "depth_scaling.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and min(image.size) > 200
    assert (tmp_path / "L4_skips-yes" / "report.json").exists()


def test_unknown_variant_is_refused(example):
    with pytest.raises(ValueError, match="variants must be among"):
        example.run_experiments(depths=(2,), epochs=1, variants=("sometimes",))
