import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from hf_resdecay.evaluation import linear_probe


@pytest.fixture(scope="module")
def digits_split():
    x, y = load_digits(return_X_y=True)
    return train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)


@pytest.mark.parametrize("protocol", ["paper", "mae"])
def test_close_to_sklearn_logistic_regression(digits_split, protocol):
    x_train, x_test, y_train, y_test = digits_split
    reference = 100 * LogisticRegression(max_iter=5000).fit(x_train, y_train).score(x_test, y_test)
    result = linear_probe(x_train, y_train, x_test, y_test, protocol=protocol)
    assert abs(result.top1 - reference) < 3.0
    assert result.top5 >= result.top1 and result.train_top1 > 95
    assert result.protocol == protocol


def test_seeded_and_defaults(digits_split):
    x_train, x_test, y_train, y_test = digits_split
    a = linear_probe(x_train, y_train, x_test, y_test, epochs=10, seed=3)
    assert a == linear_probe(x_train, y_train, x_test, y_test, epochs=10, seed=3)
    assert a.lr == 1e-2 and a.epochs == 10
    assert linear_probe(x_train, y_train, x_test, y_test, protocol="mae", epochs=2, batch_size=512).lr == 0.2


def test_arbitrary_label_values(digits_split):
    x_train, x_test, y_train, y_test = digits_split
    shifted = linear_probe(x_train, y_train * 10 + 5, x_test, y_test * 10 + 5, epochs=20)
    plain = linear_probe(x_train, y_train, x_test, y_test, epochs=20)
    assert shifted.top1 == plain.top1
    unseen = linear_probe(x_train, y_train, x_test, np.full_like(y_test, 99), epochs=2)
    assert unseen.top1 == 0.0


def test_bad_input(digits_split):
    x_train, x_test, y_train, y_test = digits_split
    with pytest.raises(ValueError, match="protocol must be one of 'paper', 'mae'"):
        linear_probe(x_train, y_train, x_test, y_test, protocol="lars")
    with pytest.raises(ValueError, match="test_labels is required"):
        linear_probe(x_train, y_train, x_test, None)
    with pytest.raises(ValueError, match="at least two classes"):
        linear_probe(x_train, np.zeros_like(y_train), x_test, y_test)
    with pytest.raises(ValueError, match="same feature dimension"):
        linear_probe(x_train, y_train, x_test[:, :10], y_test)


def test_device_and_chunked_accuracies(digits_split, monkeypatch):
    """The explicit CPU device is the default's result; accuracies scored 7 samples at a time are the same."""
    import importlib

    module = importlib.import_module("hf_resdecay.evaluation.linear_probe")
    x_train, x_test, y_train, y_test = digits_split
    default = linear_probe(x_train, y_train, x_test, y_test, epochs=5)
    assert linear_probe(x_train, y_train, x_test, y_test, epochs=5, device="cpu") == default
    monkeypatch.setattr(module, "EVAL_CHUNK", 7)
    assert linear_probe(x_train, y_train, x_test, y_test, epochs=5, device="cpu") == default
