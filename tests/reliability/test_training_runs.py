"""The training scripts as users run them: a planted pickle in a checkpoint never runs, one run per output
folder, bad flags stop before any setup, Ctrl-C says how to resume."""

import os
import pickle
import signal
import subprocess
import sys
import time

import pytest

from ..training_scripts.launch import SCRIPTS, launch, run_directly
from ..training_scripts.test_train_mae import TINY

MAE, DIFFUSION = "train_mae.py", "train_diffusion.py"
QUICK = [*TINY, "--eval_every", "0", "--dataloader_num_workers", "0"]


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_a_planted_pickle_never_runs_and_a_dead_runs_lock_is_taken_over(tmp_path):
    """A payload planted in checkpoints/checkpoint-N used to run under ``--resume_from_checkpoint latest``
    (Accelerate unpickles custom_checkpoint_*.pkl with weights_only=False); now the checkpoint is refused."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("999999999 a-dead-host\n")  # left by a killed run
    args = [
        *QUICK,
        "--output_dir",
        str(out),
        "--checkpointing_steps",
        "2",
        "--resume_from_checkpoint",
        "latest",
    ]
    first = launch(MAE, [*args, "--max_train_steps", "2"])
    assert "taking over the lock of" in first.stdout and "pid 999999999 a-dead-host" in first.stdout
    assert f"no checkpoint in {out / 'checkpoints'}: starting from step 0" in first.stdout
    assert "no labelled validation data" not in first.stdout  # MNIST has labels
    assert not (out / ".lock").exists()
    checkpoint = out / "checkpoints" / "checkpoint-2"
    assert not list(checkpoint.rglob("*.pkl"))
    marker = tmp_path / "payload-ran"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl"):
        (checkpoint / name).write_bytes(pickle.dumps(_Payload(marker)))
    resumed = run_directly(MAE, [*args, "--max_train_steps", "4"])  # the launcher adds its own traceback
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    assert not marker.exists()
    errors = [line for line in resumed.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: checkpoint {checkpoint} holds pickle files (custom_checkpoint_0.pkl, random_states_0.pkl), "
        "which could run code when loaded: they are never unpickled; resume from a checkpoint written by "
        "this version"
    ]


def _deliverable_sigint() -> None:
    """In the child before exec: SIGINT back to its default disposition and out of the blocked mask."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_a_second_run_on_the_same_folder_is_refused_and_ctrl_c_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    args = [*QUICK, "--output_dir", str(out), "--max_train_steps", "3000", "--checkpointing_steps", "2"]
    first = subprocess.Popen(
        [sys.executable, str(SCRIPTS / "train_mae.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C as a terminal delivers it: the run must not inherit an ignored or blocked SIGINT from the
        # test worker (dispositions set to ignore and the signal mask both survive exec).
        preexec_fn=_deliverable_sigint,
    )
    try:
        deadline = time.time() + 300
        while not (out / "checkpoints" / "checkpoint-2").exists():
            assert first.poll() is None and time.time() < deadline, first.communicate()[1][-3000:]
            time.sleep(0.1)
        owner = (out / ".lock").read_text().split()
        assert owner[0] == str(first.pid)
        second = run_directly(MAE, [*args, "--max_train_steps", "2"])
        assert second.returncode == 2, second.stderr[-3000:]
        assert second.stderr.splitlines()[-1] == (
            f"error: {out} is in use by another run (pid {first.pid} {owner[1]}): wait for it to end, or "
            "choose another --output_dir"
        )
        first.send_signal(signal.SIGINT)
        _, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    command = " ".join(["accelerate launch", str(SCRIPTS / "train_mae.py"), *args])
    assert errors == [
        f"error: interrupted; resume from the last checkpoint with: {command} --resume_from_checkpoint latest"
    ], stderr[-3000:]
    assert not (out / ".lock").exists()


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        (MAE, ["--dataset_name", "./no/such/data"], "--dataset_name ./no/such/data: no such folder"),
        (MAE, ["--train_dir", "{tmp}/missing"], "--train_dir {tmp}/missing: no such folder"),
        (MAE, ["--base_learning_rate", "nan"], "--base_learning_rate must be a finite number; got nan"),
        (DIFFUSION, ["--learning_rate", "inf"], "--learning_rate must be a finite number; got inf"),
        (DIFFUSION, ["--output_dir", "{tmp}/file"], "--output_dir {tmp}/file is a file, not a folder"),
        (MAE, ["--output_dir", "{tmp}/file/out"], "--output_dir {tmp}/file/out: {tmp}/file is a file"),
    ],
)  # fmt: skip
def test_bad_paths_and_non_finite_rates_stop_before_any_setup(tmp_path, script, args, message):
    (tmp_path / "file").write_text("not a folder")
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    result = run_directly(script, ["--output_dir", str(tmp_path / "out"), *args])
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message.replace("{tmp}", str(tmp_path)) in lines[-1], lines
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
    assert os.listdir(tmp_path) == ["file"]
