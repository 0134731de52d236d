"""Weighted k-nearest-neighbour classification of frozen features (DINO's protocol).

The decay paper does not publish its kNN protocol; we use DINO's (Caron et al., 2021), the common choice:
L2-normalised features, cosine similarity, the ``k`` most similar training samples vote for their class
with weight ``exp(similarity / temperature)``.

The training bank is read in blocks (each block normalised once, on ``device``), and every block is compared
with all test samples in chunks, keeping a running top-k per test sample: memory stays at one block plus
``chunk_size x block`` similarities, however large the bank (a memory-mapped array is never read whole).
With ``dtype="bfloat16"`` or ``"float16"`` the similarities that select the neighbours are computed in that
precision, and the selected neighbours' similarities are recomputed in float32 before they vote, so only
near-ties at the k-th neighbour can differ from the float32 result.
"""

from __future__ import annotations

import mmap

import numpy as np
import torch
import torch.nn.functional as F

from ._checks import as_feature_matrix, as_feature_rows, as_labels, check_same_dim
from ._runtime import as_device, as_dtype

KNN_PROTOCOL = "DINO weighted kNN (L2-normalised features, cosine similarity, votes exp(sim/T))"

SIMILARITY_BYTES = 512 << 20
"""Largest block of similarities (one test chunk against one bank block) computed at once."""


def _bank_budget(device: torch.device) -> int:
    """Bytes of normalised training features held at once: half the free memory of a GPU, 1 GiB on a CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    return 1 << 30


def _normalized_rows(features, start: int, stop: int, name: str, device: torch.device) -> torch.Tensor:
    """Rows ``start:stop`` of ``features`` as L2-normalised float32 on ``device``; a ``ValueError`` naming
    ``name`` when any of its rows is not finite."""
    if (
        isinstance(features, np.memmap)
        and isinstance(features.base, mmap.mmap)
        and features.flags.c_contiguous
    ):
        # a whole memory-mapped file: read the block with a plain read, so its pages never join this
        # process's resident memory (indexing the map would keep every block read mapped in)
        with open(features.filename, "rb") as handle:
            handle.seek(features.offset + start * features.strides[0])
            rows = np.fromfile(handle, dtype=features.dtype, count=(stop - start) * features.shape[1])
        rows = rows.reshape(stop - start, features.shape[1])
    else:
        rows = features[start:stop]
    if torch.is_tensor(rows):
        block = rows.to(device=device, dtype=torch.float32)
    else:  # no copy of in-memory float32 rows; read-only (memory-mapped) ones are copied once
        rows = np.asarray(rows, dtype=np.float32)
        block = torch.from_numpy(rows if rows.flags.writeable else rows.copy()).to(device)
    if not torch.isfinite(block).all():
        as_feature_matrix(features, name)  # raises, counting the bad rows over the whole array
    return F.normalize(block, dim=1)


def knn_scores(
    train_features,
    train_labels,
    test_features,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    bank_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class votes for every test sample: ``(scores, classes)``, both on the CPU.

    ``scores[i, c]`` is the summed weight of the neighbours of test sample ``i`` labelled ``classes[c]``
    (``classes`` are the distinct training labels, sorted). ``train_features`` may be any (samples, dim)
    array, memory-mapped ones included. ``device``: where similarities are computed (None: the training
    tensor's device, else ``"auto"``, CUDA when available); ``dtype``: the precision of the similarity matrix
    products (default float32); ``bank_bytes``: how much normalised training data to hold at once (default
    half a GPU's free memory, 1 GiB on a CPU).
    """
    train_features = as_feature_rows(train_features, "train_features")
    train_rows, dim = train_features.shape
    test = as_feature_matrix(test_features, "test_features")
    check_same_dim(train_features, "train_features", test, "test_features")
    labels = as_labels(train_labels, "train_labels", train_rows)
    if not isinstance(k, int) or not 1 <= k <= train_rows:
        raise ValueError(
            f"k must be an integer in [1, {train_rows}] (the number of training samples); got {k}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    compute = as_dtype(dtype) or torch.float32
    if device is None and torch.is_tensor(train_features):
        device = train_features.device
    target = as_device(device if device is not None else "auto")
    classes, label_index = torch.unique(labels, return_inverse=True)
    label_index = label_index.to(target)

    queries32 = F.normalize(test, dim=1).to(target)
    queries = queries32.to(compute)
    itemsize = 4 + (compute.itemsize if compute != torch.float32 else 0)
    budget = bank_bytes if bank_bytes is not None else _bank_budget(target)
    chunk_size = min(chunk_size, test.shape[0])
    block = max(k, min(budget // (dim * itemsize), SIMILARITY_BYTES // (chunk_size * compute.itemsize)))
    best_similarity = best_index = None
    for start in range(0, train_rows, block):
        stop = min(start + block, train_rows)
        bank32 = _normalized_rows(train_features, start, stop, "train_features", target)
        bank = bank32.to(compute)
        similarities, neighbours = [], []
        for first in range(0, test.shape[0], chunk_size):
            similarity, index = (queries[first : first + chunk_size] @ bank.T).topk(
                min(k, stop - start), dim=1
            )
            if compute != torch.float32:  # the selected neighbours' similarities, recomputed in float32
                rows = bank32[index]  # (chunk, k, dim)
                similarity = torch.bmm(rows, queries32[first : first + chunk_size, :, None]).squeeze(2)
            similarities.append(similarity.float())
            neighbours.append(index + start)
        similarity, index = torch.cat(similarities), torch.cat(neighbours)
        if best_similarity is not None:  # merge with the neighbours found in earlier blocks
            similarity = torch.cat([best_similarity, similarity], dim=1)
            index = torch.cat([best_index, index], dim=1)
            similarity, position = similarity.topk(k, dim=1)
            index = index.gather(1, position)
        best_similarity, best_index = similarity, index
        del bank32, bank
    weights = (best_similarity / temperature).exp()
    scores = torch.zeros(test.shape[0], len(classes), device=target)
    scores.scatter_add_(1, label_index[best_index], weights)
    return scores.cpu(), classes


def knn_predict(
    train_features,
    train_labels,
    test_features,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    bank_bytes: int | None = None,
) -> torch.Tensor:
    """Predicted label of every test sample (the class with the largest weighted vote); ``device``,
    ``dtype`` and ``bank_bytes`` as in :func:`knn_scores`."""
    scores, classes = knn_scores(
        train_features, train_labels, test_features, k, temperature, chunk_size,
        device=device, dtype=dtype, bank_bytes=bank_bytes,
    )  # fmt: skip
    return classes[scores.argmax(dim=1)]


def knn_accuracy(
    train_features,
    train_labels,
    test_features,
    test_labels,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    bank_bytes: int | None = None,
) -> dict[str, float]:
    """Top-1 and top-5 kNN accuracy in percent: ``{"top1": ..., "top5": ...}``.

    Top-5 counts a hit when the true class is among the five largest votes (all classes when fewer).
    ``device``, ``dtype`` and ``bank_bytes`` as in :func:`knn_scores`.
    """
    scores, classes = knn_scores(
        train_features, train_labels, test_features, k, temperature, chunk_size,
        device=device, dtype=dtype, bank_bytes=bank_bytes,
    )  # fmt: skip
    truth = as_labels(test_labels, "test_labels", scores.shape[0])
    ranked = classes[scores.argsort(dim=1, descending=True, stable=True)]
    hits = ranked == truth[:, None]
    return {
        "top1": 100.0 * hits[:, 0].float().mean().item(),
        "top5": 100.0 * hits[:, :5].any(dim=1).float().mean().item(),
    }
