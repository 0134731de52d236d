"""Linear probes on frozen features, in the two published protocols.

- ``"paper"``: the decay paper's code. Features (mean-pooled, CLS included, no norm) feed an ``nn.Linear``
  trained with AdamW, lr 1e-2, cosine schedule.
- ``"mae"``: MAE's recipe. ``BatchNorm1d`` without affine parameters before the linear head (a per-feature
  standardisation that makes the probe insensitive to the feature scale), lr = 0.1 x batch / 256, no
  weight decay, warmup then cosine. MAE uses LARS, whose trust ratio (1e-3) is tuned for 16k-sample
  batches over ImageNet and barely moves a probe trained on small data; we use SGD with momentum 0.9,
  which the MAE authors name as the alternative.

Both are seeded: the same call gives the same head and numbers. The probe trains on ``device`` (CUDA when
available): the training features are moved there once when they fit, else each mini-batch is; accuracies are
computed in chunks, so no (samples x classes) matrix of the whole set is ever formed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ._checks import as_feature_matrix, as_labels, check_same_dim
from ._runtime import as_device

LINEAR_PROBE_PROTOCOLS = ("paper", "mae")


@dataclass
class LinearProbeResult:
    """Accuracies in percent, and the settings that produced them."""

    top1: float
    top5: float
    train_top1: float
    protocol: str
    epochs: int
    batch_size: int
    lr: float

    def to_dict(self) -> dict:
        return asdict(self)


def _schedule(step: int, total: int, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then half-cosine to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


EVAL_CHUNK = 65536
"""Samples scored at once when measuring accuracy."""


def _accuracies(head: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (%) of ``head`` on ``features``, in chunks, on the head's device."""
    device = next(head.parameters()).device
    top1 = top5 = 0
    with torch.inference_mode():
        for start in range(0, features.shape[0], EVAL_CHUNK):
            logits = head(features[start : start + EVAL_CHUNK].to(device))
            ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = ranked == labels[start : start + EVAL_CHUNK].to(device)[:, None]
            top1 += int(hits[:, 0].sum())
            top5 += int(hits.any(dim=1).sum())
    return 100.0 * top1 / features.shape[0], 100.0 * top5 / features.shape[0]


def linear_probe(
    train_features,
    train_labels,
    test_features,
    test_labels,
    protocol: str = "paper",
    epochs: int = 100,
    batch_size: int = 256,
    lr: float | None = None,
    seed: int = 0,
    *,
    device: str | torch.device | None = None,
) -> LinearProbeResult:
    """Train a linear classifier on ``train_features`` and report its accuracy on ``test_features``.

    ``lr`` defaults to the protocol's: 1e-2 for ``"paper"``, ``0.1 * batch_size / 256`` for ``"mae"``.
    ``device``: where the probe trains (default ``"auto"``: CUDA when available).
    """
    if protocol not in LINEAR_PROBE_PROTOCOLS:
        raise ValueError(
            f"protocol must be one of {', '.join(map(repr, LINEAR_PROBE_PROTOCOLS))}; got {protocol!r}"
        )
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1; got epochs={epochs}, batch_size={batch_size}")
    train = as_feature_matrix(train_features, "train_features")
    test = as_feature_matrix(test_features, "test_features")
    check_same_dim(train, "train_features", test, "test_features")
    train_y = as_labels(train_labels, "train_labels", train.shape[0])
    test_y = as_labels(test_labels, "test_labels", test.shape[0])
    classes, train_index = torch.unique(train_y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError("train_labels must hold at least two classes for a probe")
    test_index = torch.searchsorted(classes, test_y).clamp(max=len(classes) - 1)
    test_index[classes[test_index] != test_y] = -1  # a class never seen in training can never be right

    target = as_device(device if device is not None else "auto")
    if target.type == "cuda" and train.numel() * 4 <= torch.cuda.mem_get_info(target)[0] // 2:
        train, train_index = train.to(target), train_index.to(target)  # fits: moved once, else per batch

    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(train.shape[1], len(classes))
    with torch.no_grad():
        nn.init.trunc_normal_(linear.weight, std=0.01, generator=generator)
        linear.bias.zero_()
    if protocol == "paper":
        head: nn.Module = linear
        lr = 1e-2 if lr is None else lr
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(head.to(target).parameters(), lr=lr)
        warmup = 0
    else:
        head = nn.Sequential(nn.BatchNorm1d(train.shape[1], affine=False, eps=1e-6), linear)
        lr = 0.1 * batch_size / 256 if lr is None else lr
        optimizer = torch.optim.SGD(head.to(target).parameters(), lr=lr, momentum=0.9)
        warmup = max(1, epochs // 9)  # MAE: 10 warmup epochs of 90

    steps_per_epoch = math.ceil(train.shape[0] / batch_size)
    total = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _schedule(step, total, warmup * steps_per_epoch)
    )
    loss_fn = nn.CrossEntropyLoss()
    head.train()
    for _ in range(epochs):
        order = torch.randperm(train.shape[0], generator=generator)
        for start in range(0, train.shape[0], batch_size):
            batch = order[start : start + batch_size].to(train.device)
            if protocol == "mae" and len(batch) < 2:
                continue  # BatchNorm needs two samples
            inputs = train[batch].to(target, non_blocking=True)
            loss = loss_fn(head(inputs), train_index[batch].to(target, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    head.eval()
    top1, top5 = _accuracies(head, test, test_index)
    train_top1, _ = _accuracies(head, train, train_index)
    return LinearProbeResult(top1, top5, train_top1, protocol, epochs, batch_size, lr)
