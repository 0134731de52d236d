import json
import logging

import pytest
import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.attention import BasicTransformerBlock

from hf_resdecay import DiTDecayTransformer2DModel, shortcut_coefficients
from hf_resdecay.models.dit_decay import DiTDecayBlock

from .helpers import TINY, UPSTREAM


def _inputs(config: dict = TINY, batch_size: int = 2) -> dict:
    generator = torch.Generator().manual_seed(1)
    size = config["sample_size"]
    return {
        "hidden_states": torch.randn(batch_size, config["in_channels"], size, size, generator=generator),
        "timestep": torch.tensor([10, 500][:batch_size]),
        "class_labels": torch.tensor([3, 7][:batch_size]),
    }


def _randomise_gates(model: torch.nn.Module) -> None:
    """A fresh DiT has zero adaLN-Zero gates and output head; give them weights so every path matters."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm1.linear" in name or "proj_out" in name:
                parameter.normal_(std=0.2)


def _upstream_and_ours(
    config: dict = TINY, **decay
) -> tuple[DiTTransformer2DModel, DiTDecayTransformer2DModel]:
    """A random upstream DiT and a decayed one holding the same weights (the decayed extras left as built)."""
    torch.manual_seed(0)
    upstream = DiTTransformer2DModel(**config).eval()
    _randomise_gates(upstream)
    ours = DiTDecayTransformer2DModel(**config, **decay).eval()
    missing, unexpected = ours.load_state_dict(upstream.state_dict(), strict=False)
    assert unexpected == [] and all(name.startswith("long_skip_projections.") for name in missing)
    return upstream, ours


def test_upstream_settings_match_upstream():
    upstream, ours = _upstream_and_ours(**UPSTREAM)
    assert list(ours.state_dict()) == list(upstream.state_dict())
    ours.load_state_dict(upstream.state_dict(), strict=True)
    inputs = _inputs()
    with torch.no_grad():
        expected = upstream(**inputs).sample
        torch.testing.assert_close(ours(**inputs).sample, expected, atol=1e-6, rtol=0)
        _, decayed = _upstream_and_ours(shortcut_decay=0.2, long_skip_connections=False)
        assert (decayed(**inputs).sample - expected).abs().max() > 1e-3


def test_coefficients_run_over_all_sublayers_of_all_blocks():
    for schedule in ("linear", "cosine", "constant"):
        model = DiTDecayTransformer2DModel(**TINY, shortcut_decay=0.2, shortcut_schedule=schedule)
        expected = shortcut_coefficients(2 * TINY["num_layers"], 0.2, schedule)
        assert model.shortcut_coefficients == expected
        for index, block in enumerate(model.transformer_blocks):
            assert type(block) is DiTDecayBlock
            assert (block.attention_alpha, block.mlp_alpha) == tuple(expected[2 * index : 2 * index + 2])
    assert model.shortcut_coefficients[-1] == pytest.approx(0.8)
    linear = DiTDecayTransformer2DModel(**TINY).shortcut_coefficients
    assert linear[0] == 1.0 and linear[-1] == pytest.approx(0.8) and linear == sorted(linear, reverse=True)


def test_decayed_block_computes_alpha_x_plus_gated_branch():
    """Against upstream's block forward: each decayed addition removes (1 - alpha) * x from upstream's sum."""
    _, model = _upstream_and_ours(**UPSTREAM)
    block = model.transformer_blocks[1]
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 16, 16, generator=generator)
    conditioning = {"timestep": torch.tensor([10, 500]), "class_labels": torch.tensor([3, 7])}
    mlp_inputs = []
    handle = block.norm3.register_forward_pre_hook(lambda module, args: mlp_inputs.append(args[0]))
    with torch.no_grad():
        upstream = BasicTransformerBlock.forward(block, x, **conditioning)
        torch.testing.assert_close(block(x, **conditioning), upstream, atol=0, rtol=0)

        block.attention_alpha, block.mlp_alpha = 1.0, 0.7
        got = block(x, **conditioning)
        torch.testing.assert_close(got, upstream - 0.3 * mlp_inputs[-1], atol=1e-6, rtol=1e-6)

        block.attention_alpha, block.mlp_alpha = 0.6, 1.0
        block(x, **conditioning)
        torch.testing.assert_close(mlp_inputs[-1], mlp_inputs[0] - 0.4 * x, atol=1e-6, rtol=1e-6)
    handle.remove()


@pytest.mark.parametrize("num_layers", [4, 5])
def test_long_skips_mirror_the_encoder_half(num_layers):
    config = dict(TINY, num_layers=num_layers)
    _, model = _upstream_and_ours(config, shortcut_decay=0.2)
    projections = model.long_skip_projections
    assert len(projections) == num_layers // 2
    with torch.no_grad():
        for projection in projections:
            projection.weight.normal_(std=0.3)
            projection.bias.normal_(std=0.3)
    block_inputs, block_outputs = {}, {}
    for index, block in enumerate(model.transformer_blocks):
        block.register_forward_pre_hook(lambda module, args, i=index: block_inputs.__setitem__(i, args[0]))
        block.register_forward_hook(lambda module, args, out, i=index: block_outputs.__setitem__(i, out))
    with torch.no_grad():
        model(**_inputs(config))
        first_decoder = num_layers - num_layers // 2
        for index in range(1, num_layers):
            expected = block_outputs[index - 1]
            if index >= first_decoder:
                mirrored = block_outputs[num_layers - 1 - index]
                expected = expected + projections[index - first_decoder](mirrored)
            torch.testing.assert_close(block_inputs[index], expected, msg=f"block {index}")


def test_fresh_model_initialises_as_sit():
    """As SiT/models.py: xavier Linears (packed-qkv fan, long skips too), zero adaLN and head, N(0, .02)."""
    torch.manual_seed(0)
    width = 96
    model = DiTDecayTransformer2DModel(**{**TINY, "attention_head_dim": width // 2, "num_layers": 8})
    xavier = lambda fan_in, fan_out: (2.0 / (fan_in + fan_out)) ** 0.5  # noqa: E731
    for projection in model.long_skip_projections:
        assert projection.weight.std().item() == pytest.approx(xavier(width, width), rel=0.1)
        assert not projection.bias.any()
    block = model.transformer_blocks[3]
    assert block.attn1.to_q.weight.std().item() == pytest.approx(xavier(width, 3 * width), rel=0.1)
    assert block.ff.net[0].proj.weight.std().item() == pytest.approx(xavier(width, 4 * width), rel=0.1)
    embedder = block.norm1.emb
    assert embedder.class_embedder.embedding_table.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert embedder.timestep_embedder.linear_1.weight.std().item() == pytest.approx(0.02, rel=0.1)
    patch = model.pos_embed.proj.weight
    assert patch.std().item() == pytest.approx(xavier(patch[0].numel(), patch.shape[0]), rel=0.15)
    for linear in (block.norm1.linear, model.proj_out_1, model.proj_out_2):
        assert not linear.weight.any() and not linear.bias.any()
    assert not model.pos_embed.proj.bias.any() and not block.attn1.to_out[0].bias.any()


def test_timestep_frequency_shift_follows_the_config():
    inputs = _inputs()
    inputs["timestep"] = torch.tensor([0.25, 0.75])
    torch.manual_seed(0)
    sit = DiTDecayTransformer2DModel(**TINY, timestep_freq_shift=0).eval()
    _randomise_gates(sit)
    assert all(b.norm1.emb.time_proj.downscale_freq_shift == 0 for b in sit.transformer_blocks)
    embedding = sit.transformer_blocks[0].norm1.emb.time_proj(inputs["timestep"])
    frequencies = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(128) / 128)
    arguments = inputs["timestep"][:, None] * frequencies
    torch.testing.assert_close(embedding, torch.cat([arguments.cos(), arguments.sin()], dim=-1))
    diffusers_style = DiTDecayTransformer2DModel(**TINY).eval()
    diffusers_style.load_state_dict(sit.state_dict())
    with torch.no_grad():
        assert not torch.allclose(sit(**inputs).sample, diffusers_style(**inputs).sample)
    with pytest.raises(ValueError, match="timestep_freq_shift must be 0"):
        DiTDecayTransformer2DModel(**TINY, timestep_freq_shift=2)


def test_gradients_reach_the_skips_and_gradient_checkpointing_agrees():
    _, model = _upstream_and_ours(shortcut_decay=0.2)
    model.train()
    inputs = _inputs()

    calls = []
    model.transformer_blocks[-1].attn1.register_forward_hook(lambda *args: calls.append(1))

    def output_and_gradients() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        torch.manual_seed(0)  # the same class-label dropout (train mode) in both runs
        model.zero_grad(set_to_none=True)
        output = model(**inputs).sample
        output.square().mean().backward()
        return output.detach(), {name: parameter.grad.clone() for name, parameter in model.named_parameters()}

    plain_output, plain = output_and_gradients()
    for name, grad in plain.items():
        if "long_skip_projections" in name or "transformer_blocks" in name:
            assert grad.abs().sum() > 0, name
    assert len(calls) == 1
    model.enable_gradient_checkpointing()
    checkpointed_output, checkpointed = output_and_gradients()
    assert len(calls) == 3  # the last decayed block ran again in backward: its activations were not kept
    torch.testing.assert_close(checkpointed_output, plain_output, atol=1e-6, rtol=0)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


_SHAPE = r"\(batch, 4, height, width\) with height and width multiples of patch_size=2"


@pytest.mark.parametrize(
    ("hidden_states", "message"),
    [
        (torch.zeros(2, 3, 8, 8), rf"hidden_states must have shape {_SHAPE}; got \(2, 3, 8, 8\)"),
        (torch.zeros(2, 4, 8, 7), rf"hidden_states must have shape {_SHAPE}; got \(2, 4, 8, 7\)"),
        (torch.zeros(0, 4, 8, 8), rf"at least one latent, shape {_SHAPE}; got \(0, 4, 8, 8\)"),
        (
            torch.zeros(2, 4, 8, 8, dtype=torch.float64),
            r"dtype torch.float32 \(the model's dtype\); got torch.float64",
        ),
        (
            torch.zeros(2, 4, 8, 8, dtype=torch.uint8),
            r"dtype torch.float32 \(the model's dtype\); got torch.uint8",
        ),
    ],
    ids=["channels", "odd-width", "empty-batch", "float64", "uint8"],
)
def test_bad_latents_get_a_clear_error(hidden_states, message):
    """These used to fail inside the patch embedding, or (odd sizes) lose the last row silently."""
    _, model = _upstream_and_ours(shortcut_decay=0.2)
    inputs = _inputs()
    with pytest.raises(ValueError, match=message):
        model(hidden_states, timestep=inputs["timestep"], class_labels=inputs["class_labels"])


def test_non_square_latents_keep_their_shape():
    """The output is unpatchified to the input's grid (it used to assume a square one and fail)."""
    _, model = _upstream_and_ours(shortcut_decay=0.2)
    inputs = _inputs()
    with torch.no_grad():
        output = model(
            torch.randn(2, 4, 8, 16), timestep=inputs["timestep"], class_labels=inputs["class_labels"]
        )
    assert output.sample.shape == (2, TINY["out_channels"], 8, 16)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("shortcut_decay", 1.5, r"shortcut_decay must be in \[0, 1\)"),
        ("shortcut_decay", None, r"shortcut_decay must be a real number in \[0, 1\)"),
        ("shortcut_schedule", "step", "shortcut_schedule must be one of 'linear', 'cosine', 'constant'"),
        ("sample_size", 9, r"sample_size=9 must be a multiple of patch_size=2"),
        ("patch_size", 3, r"sample_size=8 must be a multiple of patch_size=3"),
        ("patch_size", 0, r"patch_size must be >= 1; got 0"),
    ],
)
def test_invalid_settings_are_rejected(field, value, message):
    """A sample size that is not a whole number of patches used to be cropped silently."""
    with pytest.raises(ValueError, match=message):
        DiTDecayTransformer2DModel(**{**TINY, field: value})


def test_save_and_load_round_trip(tmp_path):
    _, model = _upstream_and_ours(shortcut_decay=0.3, shortcut_schedule="cosine")
    with torch.no_grad():
        for projection in model.long_skip_projections:
            projection.weight.normal_(std=0.3)
    model.save_pretrained(tmp_path)
    files = {path.name for path in tmp_path.iterdir()}
    assert files == {"config.json", "diffusion_pytorch_model.safetensors", "dit_decay.py", "shortcut.py"}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {"AutoModel": "dit_decay.DiTDecayTransformer2DModel"}
    assert (config["shortcut_decay"], config["shortcut_schedule"], config["long_skip_connections"]) == (
        0.3,
        "cosine",
        True,
    )
    loaded, info = DiTDecayTransformer2DModel.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == info["unexpected_keys"] == []
    assert loaded.shortcut_coefficients == model.shortcut_coefficients
    inputs = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).sample, model(**inputs).sample)


@pytest.mark.parametrize("low_cpu_mem_usage", [True, False])
def test_retrofit_a_stock_checkpoint(tmp_path, caplog, low_cpu_mem_usage):
    torch.manual_seed(2)
    stock = DiTTransformer2DModel(**TINY).eval()
    _randomise_gates(stock)
    stock.save_pretrained(tmp_path)
    inputs = _inputs()
    with caplog.at_level(logging.WARNING, logger="hf_resdecay.models.dit_decay"):
        model, info = DiTDecayTransformer2DModel.from_pretrained(
            tmp_path, shortcut_decay=0.2, low_cpu_mem_usage=low_cpu_mem_usage, output_loading_info=True
        )
    new = {name for name, _ in model.named_parameters() if name.startswith("long_skip_projections.")}
    assert set(info["missing_keys"]) == new and len(new) == 4
    assert info["unexpected_keys"] == info["mismatched_keys"] == []
    assert "Retrofitted" in caplog.text and "long_skip_projections.0.weight" in caplog.text
    stock_weights = stock.state_dict()
    for name, tensor in model.state_dict().items():
        if name in new:
            assert tensor.device.type == "cpu" and not tensor.any(), name
        else:
            torch.testing.assert_close(tensor, stock_weights[name], rtol=0, atol=0, msg=name)
    assert model.shortcut_coefficients[-1] == pytest.approx(0.8)
    with torch.no_grad():
        expected = stock(**inputs).sample
        assert (model(**inputs).sample - expected).abs().max() > 1e-3
        # zero long skips and no decay: exactly the stock model
        same = DiTDecayTransformer2DModel.from_pretrained(tmp_path, shortcut_decay=0.0)
        torch.testing.assert_close(same(**inputs).sample, expected, atol=1e-6, rtol=0)


def test_upstream_class_silently_drops_the_decay_and_skips(tmp_path):
    upstream, ours = _upstream_and_ours(shortcut_decay=0.3)
    ours.save_pretrained(tmp_path)
    plain, info = DiTTransformer2DModel.from_pretrained(tmp_path, output_loading_info=True)
    assert type(plain) is DiTTransformer2DModel and info["missing_keys"] == []
    assert sorted(info["unexpected_keys"]) == sorted(
        name for name in ours.state_dict() if name.startswith("long_skip_projections.")
    )
    inputs = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).sample, upstream(**inputs).sample, atol=1e-6, rtol=0)
        assert (plain(**inputs).sample - ours(**inputs).sample).abs().max() > 1e-3
