"""Shared pytest configuration.

The Hugging Face environment is set up at import time, before anything imports ``huggingface_hub`` or
``transformers`` (both read these variables once, when imported): every Hub call goes to a local fake Hub
(``tests/hub_server.py``, started by the ``hub_server`` fixture) on a free port, with an isolated cache in a
fresh temporary ``HF_HOME``. Subprocesses started by tests inherit all of this through ``os.environ``.
"""

import atexit
import os
import shutil
import sys
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

# Under pytest-xdist, split the cores between the workers: with N workers each sharing all the cores (torch's
# and OpenBLAS's default), OpenMP threads that wait on each other made CPU tests several times slower on the
# 2-core CI machine. Set through the environment, so subprocesses (CLI runs, ``accelerate launch``) follow it;
# an explicit OMP_NUM_THREADS etc. is kept.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    _threads = str(max(1, len(os.sched_getaffinity(0)) // max(1, _workers)))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, _threads)
    if "torch" in sys.modules:  # already imported (by a plugin): the variable alone would come too late
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory: pytest.TempPathFactory):
    """The fake Hub serving ``HF_ENDPOINT`` for the whole session (``.url``, ``.store`` for inspection)."""
    server = HubServer(tmp_path_factory.mktemp("hub"), port=HUB_PORT)
    with server:
        yield server


@pytest.fixture(scope="session")
def digits_dataset():
    """scikit-learn's 1,797 digits as an image ``DatasetDict`` (train 1,347 / test 450, stratified), 8x8 L."""
    import numpy as np
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images * 16).clip(0, 255).astype(np.uint8)
    train_idx, test_idx = train_test_split(
        np.arange(len(images)), test_size=0.25, random_state=0, stratify=digits.target
    )
    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})

    def split(indices):
        return Dataset.from_dict(
            {"image": list(images[indices]), "label": digits.target[indices].tolist()}, features=features
        )

    return DatasetDict({"train": split(train_idx), "test": split(test_idx)})


@pytest.fixture(scope="session")
def tiny_ddpm():
    """An untrained 16x16 RGB DDPM pipeline (10 timesteps): real diffusers plumbing in milliseconds."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    pipeline = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=10))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
