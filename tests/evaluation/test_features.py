import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import (
    ConvNextConfig,
    ConvNextModel,
    DeiTConfig,
    DeiTModel,
    Dinov2Config,
    Dinov2Model,
    ResNetConfig,
    ResNetModel,
    ViTConfig,
    ViTImageProcessorPil,
    ViTModel,
)

from hf_resdecay import ViTMAEDecayConfig, ViTMAEDecayModel
from hf_resdecay.evaluation import extract_features

TINY_VIT = dict(
    hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=16
)


@pytest.fixture(scope="module")
def processor():
    return ViTImageProcessorPil(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


@pytest.fixture
def small(digits_dataset):
    return digits_dataset["test"].select(range(40))


def _entries(cache_dir):
    """Cache entries: a folder of per-layer ``.npy`` files with its record of their SHA-256 beside it."""
    folders = sorted(path.name for path in cache_dir.iterdir() if path.is_dir())
    assert folders == sorted(path.stem for path in cache_dir.glob("*.json"))
    return folders


def _pixels(processor, dataset):
    return processor(images=[image.convert("RGB") for image in dataset["image"]], return_tensors="pt")[
        "pixel_values"
    ]


def test_decayed_mae_reads_every_patch_in_order(small, processor, tmp_path):
    torch.manual_seed(0)
    model = ViTMAEDecayModel(
        ViTMAEDecayConfig(**TINY_VIT, patch_size=4, zero_init_residual_branches=False, mask_ratio=0.75)
    )
    result = extract_features(
        model, small, layers="all", image_processor=processor, batch_size=16, cache=False
    )
    assert result.layers == [0, 1, 2, 3]
    assert model.config.mask_ratio == 0.75  # restored
    np.testing.assert_array_equal(result.labels, np.asarray(small["label"]))
    model.config.mask_ratio = 0.0
    with torch.no_grad():
        noise = torch.arange(16.0).expand(len(small), -1)
        states = model(_pixels(processor, small), noise=noise, output_hidden_states=True).hidden_states
    assert states[-1].shape[1] == 17  # CLS + all 16 patches
    for layer in result.layers:
        np.testing.assert_allclose(result.features[layer], states[layer].mean(dim=1).numpy(), atol=1e-5)


def test_cls_pooling_and_batch_boundaries(small, processor):
    torch.manual_seed(0)
    model = ViTModel(ViTConfig(**TINY_VIT, patch_size=4), add_pooling_layer=False)
    result = extract_features(
        model, small, pooling="cls", image_processor=processor, batch_size=7, cache=False
    )
    with torch.no_grad():
        expected = model(_pixels(processor, small), output_hidden_states=True).hidden_states[-1][:, 0]
    np.testing.assert_allclose(result.last(), expected.numpy(), atol=1e-5)
    again = extract_features(
        model, small, pooling="cls", image_processor=processor, batch_size=64, cache=False
    )
    np.testing.assert_allclose(again.last(), result.last(), atol=1e-6)


def test_cnn_mean_and_pooler(small, processor):
    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    model = ResNetModel(config).eval()
    mean = extract_features(model, small, image_processor=processor, cache=False)
    pooler = extract_features(model, small, pooling="pooler", image_processor=processor, cache=False)
    with torch.no_grad():
        out = model(_pixels(processor, small), output_hidden_states=True)
    np.testing.assert_allclose(mean.last(), out.hidden_states[-1].mean(dim=(2, 3)).numpy(), atol=1e-5)
    np.testing.assert_allclose(pooler.last(), out.pooler_output.flatten(1).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="pooling='cls' needs a token sequence"):
        extract_features(model, small, pooling="cls", image_processor=processor, cache=False)


@pytest.mark.parametrize(
    "model_class, config",
    [
        (DeiTModel, DeiTConfig(**TINY_VIT, patch_size=4)),
        (Dinov2Model, Dinov2Config(**TINY_VIT, patch_size=4)),
        (ConvNextModel, ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1])),
    ],
    ids=["deit", "dinov2", "convnext"],
)
def test_other_families_every_layer(small, processor, model_class, config):
    torch.manual_seed(0)
    model = model_class(config).eval()
    result = extract_features(model, small, layers="all", image_processor=processor, cache=False)
    with torch.no_grad():
        states = model(_pixels(processor, small), output_hidden_states=True).hidden_states
    assert result.layers == list(range(len(states)))
    for layer in result.layers:
        dims = (2, 3) if states[layer].ndim == 4 else (1,)
        np.testing.assert_allclose(result.features[layer], states[layer].mean(dim=dims).numpy(), atol=1e-5)


def test_disk_cache_is_keyed_by_weights_and_data(small, processor, tmp_path):
    torch.manual_seed(0)
    model = ViTModel(ViTConfig(**TINY_VIT, patch_size=4), add_pooling_layer=False)
    options = dict(image_processor=processor, cache_dir=tmp_path, layers="all")
    first = extract_features(model, small, **options)
    second = extract_features(model, small, **options)
    assert "cached" not in first.meta and "cached" in second.meta
    for layer in first.layers:
        np.testing.assert_array_equal(first.features[layer], second.features[layer])
    with torch.no_grad():
        model.layers[0].mlp.fc2.weight.add_(1.0)
    changed = extract_features(model, small, **options)
    assert "cached" not in changed.meta and not np.allclose(changed.last(), first.last())
    other_data = extract_features(model, small.select(range(20)), **options)
    assert "cached" not in other_data.meta and len(other_data.last()) == 20
    assert len(_entries(tmp_path)) == 3 and not list(tmp_path.glob(".*.partial"))


def test_layers_are_normalised_deduplicated_and_range_checked(small, processor, tmp_path):
    """On a 2-block model, 5 used to wrap round to layer 2 and ``2, -1`` to double layer 2's rows."""
    torch.manual_seed(0)
    model = ViTModel(ViTConfig(**{**TINY_VIT, "num_hidden_layers": 2}, patch_size=4), add_pooling_layer=False)
    options = dict(image_processor=processor, cache_dir=tmp_path)
    every = extract_features(model, small, layers="all", cache=False, **options)
    both = extract_features(model, small, layers=[2, -1, -3, 0], **options)
    assert both.layers == [0, 2] and {len(rows) for rows in both.features.values()} == {len(small)}
    np.testing.assert_array_equal(both.features[2], every.features[2])
    again = extract_features(model, small, layers=(0, 2), **options)
    assert "cached" in again.meta and again.layers == [0, 2]  # the same layers share one cache entry
    for layers in ([5], [0, 99], [-4]):
        with pytest.raises(ValueError, match=r"layers: .* out of range .* 2 blocks.* 0 \(embeddings\) to 2"):
            extract_features(model, small, layers=layers, **options)
    with pytest.raises(ValueError, match="layers must name at least one layer"):
        extract_features(model, small, layers=[], cache=False, **options)
    with pytest.raises(ValueError, match="layers must be 'all' or a sequence of integers; got 'last'"):
        extract_features(model, small, layers="last", cache=False, **options)
    assert len(_entries(tmp_path)) == 1


def test_bad_input(small, processor):
    model = ViTModel(ViTConfig(**TINY_VIT, patch_size=4), add_pooling_layer=False)
    no_images = Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
    with pytest.raises(ValueError, match=r"no image column: columns are \['text', 'label'\]"):
        extract_features(model, no_images, cache=False)
    with pytest.raises(ValueError, match="pooling must be one of 'mean', 'cls', 'pooler'"):
        extract_features(model, small, pooling="max")
    with pytest.raises(ValueError, match="image_column='picture' is not a column"):
        extract_features(model, small, image_column="picture", image_processor=processor)
