"""Shared pytest configuration.

The Hugging Face environment is set up at import time, before anything imports ``huggingface_hub`` or
``transformers`` (both read these variables once, when imported): every Hub call goes to a local fake Hub
(``tests/hub_server.py``, started by the ``hub_server`` fixture) on a free port, with an isolated cache in a
fresh temporary ``HF_HOME``. Subprocesses started by tests inherit all of this through ``os.environ``.
"""

import atexit
import os
import shutil
import tempfile

import pytest

from .hub_server import HubServer, free_port

HUB_PORT = free_port()
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{HUB_PORT}"
os.environ["HF_HUB_DISABLE_XET"] = "1"  # the fake Hub only speaks the git-LFS protocol
os.environ["HF_TOKEN"] = "hf_test_token"  # any token is accepted
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="hf_home_")
atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)
for _var in ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):
    os.environ.pop(_var, None)  # these would bypass the fake Hub or the isolated cache
# Never send local traffic through a proxy configured in the environment.
os.environ["NO_PROXY"] = os.environ["no_proxy"] = ",".join(
    filter(None, [os.environ.get("NO_PROXY") or os.environ.get("no_proxy"), "127.0.0.1", "localhost"])
)


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory: pytest.TempPathFactory):
    """The fake Hub serving ``HF_ENDPOINT`` for the whole session (``.url``, ``.store`` for inspection)."""
    server = HubServer(tmp_path_factory.mktemp("hub"), port=HUB_PORT)
    with server:
        yield server
