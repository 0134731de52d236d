"""The training-curves experiment on a tiny model: every point scored, step 0 the seeded initialisation.

Smoke data is too small for any claim: this checks that every number is produced, not what it says.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = (
    "--patch_size 4 --hidden_size 32 --num_hidden_layers 2 --num_attention_heads 2 --intermediate_size 64 "
    "--decoder_hidden_size 16 --decoder_num_hidden_layers 1 --decoder_num_attention_heads 2 "
    "--decoder_intermediate_size 32 --per_device_train_batch_size 16 --max_train_samples 64"
)


def _experiment():
    sys.path.insert(0, str(ROOT / "experiments"))
    spec = importlib.util.spec_from_file_location(
        "training_curves", ROOT / "experiments" / "training_curves.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_curves_score_every_checkpoint_and_resume(tmp_path):
    experiment = _experiment()
    argv = [
        "--output", str(tmp_path), "--dataset", "embedded:mnist", "--image-size", "16", "--variants", "plain",
        "--max-train-steps", "4", "--points", "2", "--eval-train-samples", "100", "--eval-test-samples", "50",
        "--norm-samples", "8", "--threads", "1", "--train-args", TINY,
    ]  # fmt: skip
    curves = experiment.main(argv)
    points = curves["plain"]
    assert [point["step"] for point in points] == [0, 2, 4]
    for point in points:
        assert len(point["knn_top1"]) == len(point["effective_rank"]) == len(point["norms"]) == 3
        assert all(0 <= value <= 100 for value in point["knn_top1"])
        assert all(value > 0 for value in point["norms"])
    assert points[0]["norms"] != points[-1]["norms"]  # training moved the weights
    assert (tmp_path / "curves.md").read_text().count("| plain |") == 3
    assert (tmp_path / "curves.png").stat().st_size > 0

    log = tmp_path / "plain" / "seed-0.log"
    size = log.stat().st_size
    again = experiment.main(argv)  # finished runs are read back, neither retrained nor rescored
    assert again["plain"] == points
    assert log.stat().st_size == size


def test_points_must_fit_in_the_budget(capsys):
    experiment = _experiment()
    with pytest.raises(SystemExit) as error:
        experiment.parse_args(["--max-train-steps", "2", "--points", "3"])
    assert error.value.code == 2
    assert "--points must be <= --max-train-steps (2); got 3" in capsys.readouterr().err
