"""What a training run prints around the progress bar: lines of the epoch hooks stand on their own lines,
in order with the bar even when stdout is a block-buffered pipe, epochs are numbered from 1 on the bar and
in the lines, and the kNN monitor says what it is doing before it runs."""

import os
import re
import subprocess

from ..training_scripts.launch import launch_command
from ..training_scripts.test_train_mae import TINY

BAR_EPOCH = re.compile(r"train:.*epoch=(\d+)")


def _combined_output(args: list[str]) -> str:
    """stdout and stderr of ``accelerate launch train_mae.py`` in one pipe, as ``2>&1 | tee log`` gives
    them, with Python's default buffering (stdout block-buffered) rather than this shell's setting."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    result = subprocess.run(
        launch_command("train_mae.py", [*TINY, *args]),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    return result.stdout


def test_hook_lines_stand_apart_from_the_bar_and_count_epochs_from_one(tmp_path):
    output = _combined_output(["--output_dir", str(tmp_path / "run"), "--num_train_epochs", "3"])
    # What a terminal shows of each line: the text after its last carriage return (a bar redraw).
    shown = [line.rsplit("\r", 1)[-1] for line in output.split("\n")]
    expected = [
        r"epoch 1: kNN monitor on 256 \+ 128 images\.\.\.",
        r"epoch 1: kNN top-1 \d+\.\d\d%",
        r"epoch 2: kNN monitor on 256 \+ 128 images\.\.\.",
        r"epoch 2: kNN top-1 \d+\.\d\d%",
        r"final kNN monitor on 256 \+ 128 images\.\.\.",
        r"final kNN top-1: \d+\.\d\d%",
    ]
    knn_lines = [line for line in shown if "kNN" in line]
    assert len(knn_lines) == len(expected), knn_lines
    for line, pattern in zip(knn_lines, expected, strict=True):
        assert re.fullmatch(pattern, line), (line, pattern)
    # In the stream, the bar shows epoch N up to epoch N's lines, and epoch N + 1 only after them.
    for epoch in (1, 2):
        bars_before = BAR_EPOCH.findall(output[: output.index(f"epoch {epoch}: kNN monitor")])
        assert bars_before[-1] == str(epoch) and max(map(int, bars_before)) == epoch
        assert output.index(f"epoch={epoch + 1}") > output.index(f"epoch {epoch}: kNN top-1")
    assert sorted(set(BAR_EPOCH.findall(output))) == ["1", "2", "3"]
