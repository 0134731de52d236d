"""The reproduction experiment's smoke setting: every variant trained through the real script and scored.

Smoke data is too small for any claim: this checks that every number is produced, not what it says.
"""

import importlib.util
import json
import math
from pathlib import Path

from PIL import Image

PATH = Path(__file__).resolve().parents[2] / "experiments" / "reproduce_mae.py"


def _experiment():
    spec = importlib.util.spec_from_file_location("reproduce_mae", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_produces_every_number_and_resumes(tmp_path):
    experiment = _experiment()
    out = tmp_path / "mae"
    summary = experiment.main(["--smoke", "--output", str(out)])
    assert list(summary) == list(experiment.VARIANTS)
    for variant, entry in summary.items():
        assert entry["seeds"] == [0, 1]
        for metric in experiment.METRICS:
            assert len(entry[metric]["values"]) == 2, (variant, metric)
            assert all(math.isfinite(value) for value in entry[metric]["values"]), (variant, metric)
        assert len(entry["knn_top1_per_layer"]) == 3  # embeddings + 2 blocks
    assert summary["plain"]["alpha_eff"]["mean"] == 1.0 and summary["decay_0.4"]["alpha_eff"]["mean"] < 1.0
    saved = json.loads((out / "results.json").read_text())
    assert saved["variants"]["decay_0.3"]["knn_top1"] == summary["decay_0.3"]["knn_top1"]
    table = (out / "results.md").read_text().splitlines()
    assert len(table) == 2 + len(experiment.VARIANTS) and " ± " in table[2]
    with Image.open(out / "depth.png") as image:
        assert image.format == "PNG"

    weights = out / "decay_0.3" / "seed-0" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = experiment.main(["--smoke", "--output", str(out), "--variants", "decay_0.3"])
    assert weights.stat().st_mtime_ns == before  # finished runs are not redone
    assert again["decay_0.3"]["knn_top1"] == summary["decay_0.3"]["knn_top1"]
