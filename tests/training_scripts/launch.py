"""Run a training script the way users do: ``accelerate launch``, in a fresh process; and kill one mid-run.
Or import one, to test its pieces (parser, model building) without training."""

import contextlib
import importlib.util
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..hub_server import free_port

SCRIPTS = Path(__file__).resolve().parents[2] / "training_scripts"
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--dynamo_backend", "no"]


def launch_command(script: str, args: list[str], processes: int = 1, precision: str = "no") -> list[str]:
    extra = ["--num_processes", "1"]
    if processes > 1:  # a free rendezvous port: the default, 29500, collides across pytest-xdist workers
        extra = ["--multi_gpu", "--num_processes", str(processes), "--main_process_port", str(free_port())]
    return [*LAUNCH, "--mixed_precision", precision, *extra, str(SCRIPTS / script), *args]


def launch(
    script: str,
    args: list[str],
    processes: int = 1,
    env: dict | None = None,
    check: bool = True,
    precision: str = "no",
) -> subprocess.CompletedProcess:
    """``accelerate launch --mixed_precision <precision> training_scripts/<script> <args>``; with ``check``,
    fail on a non-zero exit."""
    result = subprocess.run(
        launch_command(script, args, processes, precision),
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=900,
    )
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def launch_and_kill(script: str, args: list[str], when_exists: Path, timeout: float = 600) -> None:
    """Launch, wait for ``when_exists`` to appear (e.g. a checkpoint), then SIGKILL the process group."""
    process = subprocess.Popen(
        launch_command(script, args),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + timeout
    while not when_exists.exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def run_directly(script: str, args: list[str]) -> subprocess.CompletedProcess:
    """The script under plain ``python`` (argument errors must stop it before any training)."""
    return subprocess.run([sys.executable, str(SCRIPTS / script), *args], capture_output=True, text=True)


def run_in_process(script: str, args: list[str]) -> subprocess.CompletedProcess:
    """``main(args)`` of ``training_scripts/<script>`` in this process, its exit status and output captured:
    argument errors stop it before any training, so this tests them without a new interpreter's start-up."""
    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            load_script(script).main(args)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
    return subprocess.CompletedProcess([script, *args], code, stdout.getvalue(), stderr.getvalue())


def load_script(script: str):
    """``training_scripts/<script>`` imported as a module (its ``main`` does not run)."""
    path = SCRIPTS / script
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module
