import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

from hf_resdecay.evaluation import knn_accuracy, knn_predict, knn_scores


def _brute_force(train, train_labels, test, k, temperature):
    """DINO's weighted vote written with numpy, one test sample at a time."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    classes = np.unique(train_labels)
    predictions, votes_all = [], []
    for row in test:
        similarity = train @ (row / np.linalg.norm(row))
        nearest = np.argsort(-similarity, kind="stable")[:k]
        votes = np.zeros(len(classes))
        for index in nearest:
            votes[np.searchsorted(classes, train_labels[index])] += np.exp(similarity[index] / temperature)
        votes_all.append(votes)
        predictions.append(classes[np.argmax(votes)])
    return np.array(predictions), np.array(votes_all)


@pytest.fixture
def clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 24)) * 2
    train_labels = rng.choice([3, 7, 11, 20, 42], size=600)
    test_labels = rng.choice([3, 7, 11, 20, 42], size=150)
    lookup = {label: i for i, label in enumerate([3, 7, 11, 20, 42])}
    train = np.stack([centres[lookup[y]] for y in train_labels]) + rng.normal(size=(600, 24)) * 1.5
    test = np.stack([centres[lookup[y]] for y in test_labels]) + rng.normal(size=(150, 24)) * 1.5
    return train.astype(np.float32), train_labels, test.astype(np.float32), test_labels


@pytest.mark.parametrize(("k", "temperature", "chunk_size"), [(20, 0.07, 1024), (5, 0.5, 7), (1, 0.07, 1)])
def test_matches_brute_force_numpy(clusters, k, temperature, chunk_size):
    train, train_labels, test, _ = clusters
    expected_predictions, expected_votes = _brute_force(train, train_labels, test, k, temperature)
    scores, classes = knn_scores(train, train_labels, test, k, temperature, chunk_size)
    np.testing.assert_allclose(scores.numpy(), expected_votes, rtol=1e-4)
    np.testing.assert_array_equal(classes.numpy(), np.unique(train_labels))
    predictions = knn_predict(train, train_labels, test, k, temperature, chunk_size)
    np.testing.assert_array_equal(predictions.numpy(), expected_predictions)


def test_matches_sklearn_with_the_same_weighting(clusters):
    train, train_labels, test, _ = clusters
    normalise = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    reference = KNeighborsClassifier(
        n_neighbors=20, algorithm="brute", metric="cosine", weights=lambda d: np.exp((1 - d) / 0.07)
    ).fit(normalise(train), train_labels)
    np.testing.assert_array_equal(
        knn_predict(train, train_labels, test).numpy(), reference.predict(normalise(test))
    )


def test_accuracy_top1_and_top5(clusters):
    train, train_labels, test, test_labels = clusters
    result = knn_accuracy(train, train_labels, test, test_labels)
    expected_top1 = 100 * np.mean(_brute_force(train, train_labels, test, 20, 0.07)[0] == test_labels)
    assert result["top1"] == pytest.approx(expected_top1)
    assert result["top5"] == 100.0  # five classes: the truth is always among the top five
    assert knn_accuracy(train, train_labels, test, np.full(150, 999))["top1"] == 0.0


def test_scale_invariance_and_tensor_inputs(clusters):
    train, train_labels, test, test_labels = clusters
    a = knn_accuracy(train, train_labels, test, test_labels)
    b = knn_accuracy(torch.from_numpy(train) * 10, torch.from_numpy(train_labels), test * 0.1, test_labels)
    assert a == b


def test_bad_input(clusters):
    train, train_labels, test, _ = clusters
    with pytest.raises(ValueError, match="same feature dimension; got 24 and 23"):
        knn_predict(train, train_labels, test[:, :23])
    with pytest.raises(ValueError, match="train_labels is required"):
        knn_predict(train, None, test)
    with pytest.raises(ValueError, match=r"train_labels must hold one label per sample \(600\)"):
        knn_predict(train, train_labels[:10], test)
    bad = test.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="test_features holds NaN or inf values in 1 of 150"):
        knn_predict(train, train_labels, bad)
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 600\]"):
        knn_predict(train, train_labels, test, k=601)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        knn_predict(train, train_labels, test, temperature=0)
    with pytest.raises(ValueError, match="must be 2-D"):
        knn_predict(train[0], train_labels, test)


def test_a_streamed_memory_mapped_bank_gives_the_one_block_scores(clusters, tmp_path):
    """A bank read in blocks of k rows (a running top-k merged block by block) from a read-only memory map."""
    train, train_labels, test, _ = clusters
    np.save(tmp_path / "bank.npy", train)
    mapped = np.load(tmp_path / "bank.npy", mmap_mode="r")
    whole, classes = knn_scores(train, train_labels, test, device="cpu")
    for bank_bytes in (20 * 24 * 4, 7 * 24 * 4 * 20):  # 20 rows a block (= k), then 140
        streamed, same = knn_scores(mapped, train_labels, test, device="cpu", bank_bytes=bank_bytes)
        np.testing.assert_allclose(streamed.numpy(), whole.numpy(), rtol=1e-5)
        assert torch.equal(same, classes)
    expected, _ = _brute_force(train, train_labels, test, 20, 0.07)
    np.testing.assert_array_equal(knn_predict(mapped, train_labels, test, bank_bytes=2000).numpy(), expected)
    bad = train.copy()
    bad[[5, 590], 0] = np.inf
    with pytest.raises(ValueError, match="train_features holds NaN or inf values in 2 of 600"):
        knn_predict(bad, train_labels, test, bank_bytes=2000)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_similarities_give_the_float32_predictions(clusters, dtype):
    """Neighbours chosen from half-precision similarities, their votes weighed in float32: the predictions
    of the float32 path and of scikit-learn, the votes within float32 rounding."""
    train, train_labels, test, test_labels = clusters
    normalise = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    reference = KNeighborsClassifier(
        n_neighbors=20, algorithm="brute", metric="cosine", weights=lambda d: np.exp((1 - d) / 0.07)
    ).fit(normalise(train), train_labels)
    full, _ = knn_scores(train, train_labels, test)
    half, _ = knn_scores(train, train_labels, test, device="cpu", dtype=dtype, bank_bytes=20_000)
    np.testing.assert_array_equal(
        knn_predict(train, train_labels, test, dtype=dtype).numpy(), reference.predict(normalise(test))
    )
    np.testing.assert_allclose(half.numpy(), full.numpy(), rtol=1e-4)
    assert knn_accuracy(train, train_labels, test, test_labels, dtype=dtype) == knn_accuracy(
        train, train_labels, test, test_labels
    )
