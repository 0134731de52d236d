"""Run Python code in a fresh interpreter where ``import hf_resdecay`` fails, as on a machine without it."""

import os
import subprocess
import sys
import textwrap

HIDE_PACKAGE = textwrap.dedent(
    """
    import sys
    sys.modules["hf_resdecay"] = None  # hide the installed package
    try:
        import hf_resdecay
    except ImportError:
        pass
    else:
        raise SystemExit("hf_resdecay is still importable")
    """
)


def run_without_package(code: str, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` (dedented) with ``args`` as ``sys.argv[1:]``; fail the test on a non-zero exit."""
    result = subprocess.run(
        [sys.executable, "-c", HIDE_PACKAGE + textwrap.dedent(code), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result
