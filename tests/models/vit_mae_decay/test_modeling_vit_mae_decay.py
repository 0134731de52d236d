import logging

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import (
    AutoModel,
    AutoModelForPreTraining,
    ViTMAEConfig,
    ViTMAEForPreTraining,
    ViTMAEModel,
)
from transformers.models.vit_mae.modeling_vit_mae import ViTMAELayer, build_2d_sinusoidal_position_embedding

from hf_resdecay import (
    ViTMAEDecayConfig,
    ViTMAEDecayForPreTraining,
    ViTMAEDecayModel,
    shortcut_coefficients,
)
from hf_resdecay.models.vit_mae_decay.modeling_vit_mae_decay import ViTMAEDecayLayer

from .helpers import NUM_PATCHES, TINY, UPSTREAM_RECIPE


def _upstream_pair(seed: int = 0) -> tuple[ViTMAEForPreTraining, ViTMAEDecayForPreTraining]:
    """A randomly initialised upstream MAE and a decayed one (upstream settings) holding the same weights."""
    torch.manual_seed(seed)
    upstream = ViTMAEForPreTraining(ViTMAEConfig(**TINY)).eval()
    with torch.no_grad():  # upstream 5.x leaves these at zero on a fresh model; make them matter
        for parameter in (upstream.vit.embeddings.position_embeddings, upstream.decoder.decoder_pos_embed):
            parameter.normal_()
        upstream.decoder.mask_token.normal_()
    ours = ViTMAEDecayForPreTraining(ViTMAEDecayConfig(**TINY, **UPSTREAM_RECIPE)).eval()
    ours.load_state_dict(upstream.state_dict(), strict=True)
    return upstream, ours


def _recipe_model(**overrides) -> ViTMAEDecayForPreTraining:
    """The released recipe with non-zero branch weights, so every path carries signal."""
    torch.manual_seed(0)
    config = ViTMAEDecayConfig(**TINY, **{"zero_init_residual_branches": False, **overrides})
    return ViTMAEDecayForPreTraining(config).eval()


def test_zero_decay_matches_upstream_pretraining(pixel_values, noise):
    upstream, ours = _upstream_pair()
    expected = upstream(pixel_values, noise=noise, output_hidden_states=True)
    got = ours(pixel_values, noise=noise, output_hidden_states=True)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.mask, expected.mask)
    assert len(got.hidden_states) == len(expected.hidden_states) == TINY["num_hidden_layers"] + 1
    for ours_state, upstream_state in zip(got.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(ours_state, upstream_state, atol=1e-6, rtol=0)


def test_zero_decay_matches_upstream_encoder_and_norm_pix_loss(pixel_values, noise):
    torch.manual_seed(0)
    upstream = ViTMAEModel(ViTMAEConfig(**TINY)).eval()
    ours = ViTMAEDecayModel(ViTMAEDecayConfig(**TINY, **UPSTREAM_RECIPE)).eval()
    ours.load_state_dict(upstream.state_dict(), strict=True)
    torch.testing.assert_close(
        ours(pixel_values, noise=noise).last_hidden_state,
        upstream(pixel_values, noise=noise).last_hidden_state,
        atol=1e-6,
        rtol=0,
    )
    upstream_mae, ours_mae = _upstream_pair()
    upstream_mae.config.norm_pix_loss = ours_mae.config.norm_pix_loss = True
    torch.testing.assert_close(
        ours_mae(pixel_values, noise=noise).loss,
        upstream_mae(pixel_values, noise=noise).loss,
        atol=1e-6,
        rtol=0,
    )


def test_layers_carry_the_schedule_in_sublayer_order():
    for schedule in ("linear", "cosine", "constant"):
        model = ViTMAEDecayModel(ViTMAEDecayConfig(**TINY, shortcut_decay=0.4, shortcut_schedule=schedule))
        expected = shortcut_coefficients(2 * TINY["num_hidden_layers"], 0.4, schedule)
        assert model.shortcut_coefficients == expected
        assert [(layer.attention_alpha, layer.mlp_alpha) for layer in model.layers] == list(
            zip(expected[::2], expected[1::2], strict=True)
        )
    pretraining = _recipe_model(shortcut_decay=0.3)
    assert pretraining.shortcut_coefficients == shortcut_coefficients(8, 0.3)
    assert pretraining.shortcut_coefficients[0] == 1.0
    assert pretraining.shortcut_coefficients[-1] == pytest.approx(0.7)


def test_decayed_layer_computes_alpha_x_plus_branch():
    """Recompute each encoder block from its submodules: x = a1 x + attn(LN x); x = a2 x + mlp(LN x)."""
    model = _recipe_model(shortcut_decay=0.35)
    hidden = torch.randn(2, 5, TINY["hidden_size"])
    for layer in model.vit.layers:
        attention, _ = layer.attention(layer.layernorm_before(hidden))
        middle = layer.attention_alpha * hidden + attention
        expected = layer.mlp_alpha * middle + layer.mlp(layer.layernorm_after(middle))
        torch.testing.assert_close(layer(hidden), expected, atol=1e-6, rtol=1e-6)
        hidden = expected


def test_decay_changes_the_encoder_and_the_decoder_keeps_identity_shortcuts(pixel_values, noise):
    plain = _recipe_model(shortcut_decay=0.0)
    decayed = _recipe_model(shortcut_decay=0.3)
    decayed.load_state_dict(plain.state_dict())
    features = [m.vit(pixel_values, noise=noise).last_hidden_state for m in (plain, decayed)]
    assert not torch.allclose(*features)
    assert decayed.shortcut_coefficients != plain.shortcut_coefficients
    assert all(type(layer) is ViTMAELayer for layer in decayed.decoder.decoder_layers)


def test_zero_init_of_residual_branches_and_pixel_head():
    model = ViTMAEDecayForPreTraining(ViTMAEDecayConfig(**TINY))
    layers = [*model.vit.layers, *model.decoder.decoder_layers]
    for layer in layers:
        for projection in (layer.attention.o_proj, layer.mlp.fc2):
            assert torch.count_nonzero(projection.weight) == 0 and torch.count_nonzero(projection.bias) == 0
        assert torch.count_nonzero(layer.attention.q_proj.weight) > 0
    assert torch.count_nonzero(model.decoder.decoder_pred.weight) == 0
    for skip in model.decoder.skip_layers:
        assert torch.count_nonzero(skip.proj_out.weight) == 0
        assert torch.count_nonzero(skip.proj_in.weight) > 0
    plain = ViTMAEDecayForPreTraining(ViTMAEDecayConfig(**TINY, zero_init_residual_branches=False))
    assert torch.count_nonzero(plain.vit.layers[0].mlp.fc2.weight) > 0
    assert torch.count_nonzero(plain.decoder.decoder_pred.weight) > 0


def _xavier_std(fan_in: int, fan_out: int) -> float:
    return (2.0 / (fan_in + fan_out)) ** 0.5


def test_fresh_recipe_model_initialises_as_released():
    """Every Linear xavier-uniform (q/k/v with the packed qkv fan), zero biases, eps 1e-6."""
    config = ViTMAEDecayConfig(**{**TINY, "hidden_size": 192, "intermediate_size": 768})
    assert config.initializer == "mae" and config.layer_norm_eps == 1e-6
    torch.manual_seed(0)
    model = ViTMAEDecayForPreTraining(config)
    checked = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or torch.count_nonzero(module.weight) == 0:
            continue
        fan_out = module.out_features * (
            3 if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj") else 1
        )
        expected = _xavier_std(module.in_features, fan_out)
        bound = expected * 3**0.5
        assert module.weight.abs().max() <= bound + 1e-7, name
        assert module.weight.std().item() == pytest.approx(expected, rel=0.15), name
        assert torch.count_nonzero(module.bias) == 0, name
        checked += 1
    assert checked == 4 * 4 + 3 * 4 + 1 + 2  # q/k/v/fc1 of 4 + 3 blocks, decoder_embed, 2 skip proj_in
    zeroed = [model.vit.layers[0].attention.o_proj, model.vit.layers[0].mlp.fc2, model.decoder.decoder_pred]
    zeroed += [model.decoder.skip_layers[0].proj_out]
    assert all(torch.count_nonzero(m.weight) == 0 and torch.count_nonzero(m.bias) == 0 for m in zeroed)
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    for token in (model.vit.embeddings.cls_token, model.decoder.decoder_cls_token):
        assert token.std().item() == pytest.approx(0.02, rel=0.5)
    assert model.decoder.decoder_cls_token.shape == (1, 1, TINY["decoder_hidden_size"])
    assert model.decoder.decoder_embed.in_features == TINY["decoder_hidden_size"]


def test_transformers_initializer_draws_upstream_normal():
    config = ViTMAEDecayConfig(**{**TINY, "hidden_size": 192}, initializer="transformers")
    torch.manual_seed(0)
    weight = ViTMAEDecayForPreTraining(config).vit.layers[0].attention.q_proj.weight
    assert weight.std().item() == pytest.approx(config.initializer_range, rel=0.1)
    with pytest.raises(ValueError, match="initializer must be one of 'mae', 'transformers'; got 'xavier'"):
        ViTMAEDecayConfig(**TINY, initializer="xavier")


def test_fresh_model_has_sincos_position_embeddings():
    model = ViTMAEDecayForPreTraining(ViTMAEDecayConfig(**TINY))
    grid = int(NUM_PATCHES**0.5)
    for parameter in (model.vit.embeddings.position_embeddings, model.decoder.decoder_pos_embed):
        table = build_2d_sinusoidal_position_embedding(grid, grid, parameter.shape[-1], cls_token=True)
        half = table.shape[-1] // 2
        torch.testing.assert_close(parameter[0], torch.cat([table[:, half:], table[:, :half]], dim=-1))
        assert not parameter.requires_grad


def test_final_layernorm_flag(pixel_values, noise):
    without = _recipe_model(encoder_final_layernorm=False)
    out = without.vit(pixel_values, noise=noise, output_hidden_states=True)
    torch.testing.assert_close(out.last_hidden_state, out.hidden_states[-1])
    assert not any("vit.layernorm" in name for name, _ in without.named_parameters())
    with_norm = _recipe_model(encoder_final_layernorm=True)
    out = with_norm.vit(pixel_values, noise=noise, output_hidden_states=True)
    expected = with_norm.vit.layernorm(out.hidden_states[-1])
    torch.testing.assert_close(out.last_hidden_state, expected)


def _manual_skip_decoder(model: ViTMAEDecayForPreTraining, pixel_values, noise) -> torch.Tensor:
    """Design §1.4 written out per sample with explicit loops, as an independent reference."""
    config = model.config
    encoder = model.vit(pixel_values, noise=noise, output_hidden_states=True)
    block_outputs = encoder.hidden_states[1:]
    decoder = model.decoder
    batch = pixel_values.shape[0]
    keep = int(NUM_PATCHES * (1 - config.mask_ratio))
    order = torch.argsort(noise, dim=1)
    depth = config.num_hidden_layers
    sources = [depth - 1 - 2 * i for i in range(min((depth + 1) // 2, config.decoder_num_hidden_layers))]
    rows = [decoder.decoder_cls_token[0, 0]] + [
        decoder.decoder_pos_embed[0, 1 + p] for p in range(NUM_PATCHES)
    ]
    x = torch.stack([decoder.decoder_embed(row) for row in rows]).expand(batch, -1, -1)
    for index, layer in enumerate(decoder.decoder_layers):
        if index < len(sources):
            skip_layer = decoder.skip_layers[index]
            source = block_outputs[sources[index]]
            full = torch.empty(batch, NUM_PATCHES + 1, config.hidden_size)
            for b in range(batch):
                full[b, 0] = source[b, 0]
                for patch in range(NUM_PATCHES):
                    full[b, 1 + patch] = skip_layer.mask_token[0, 0]
                for rank in range(keep):
                    full[b, 1 + order[b, rank]] = source[b, 1 + rank]
            hidden = F.silu(skip_layer.proj_in(torch.cat([full, x], dim=-1)))
            x = x + skip_layer.proj_out(hidden)
        x = layer(x)
    return decoder.decoder_pred(decoder.decoder_norm(x))[:, 1:]


def test_skip_connections_follow_the_design(pixel_values, noise):
    model = _recipe_model(shortcut_decay=0.3)
    with torch.no_grad():
        for skip in model.decoder.skip_layers:
            skip.mask_token.normal_()
    assert len(model.decoder.skip_layers) == 2  # encoder blocks 3 and 1 feed decoder blocks 0 and 1
    assert not hasattr(model.decoder, "mask_token")
    torch.testing.assert_close(
        model(pixel_values, noise=noise).logits,
        _manual_skip_decoder(model, pixel_values, noise),
        atol=1e-5,
        rtol=1e-5,
    )


def test_every_trainable_parameter_gets_a_gradient(pixel_values, noise):
    """No unused parameters: distributed data parallel would need find_unused_parameters otherwise."""
    for skips in (True, False):
        model = _recipe_model(decoder_skip_connections=skips).train()
        model(pixel_values, noise=noise).loss.backward()
        unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert unused == []


def test_hidden_states_only_when_asked(pixel_values, noise):
    model = _recipe_model()
    assert model(pixel_values, noise=noise).hidden_states is None
    states = model(pixel_values, noise=noise, output_hidden_states=True).hidden_states
    assert len(states) == TINY["num_hidden_layers"] + 1
    encoder_states = model.vit(pixel_values, noise=noise, output_hidden_states=True).hidden_states
    for a, b in zip(states, encoder_states, strict=True):
        torch.testing.assert_close(a, b)


def test_gradient_checkpointing_gives_the_same_gradients(pixel_values, noise):
    reference = _recipe_model().train()
    reference(pixel_values, noise=noise).loss.backward()
    checkpointed = _recipe_model().train()
    checkpointed.activation_checkpointing_enable()
    assert checkpointed.is_activation_checkpointing
    calls = []
    checkpointed.vit.layers[0].layernorm_before.register_forward_hook(lambda *args: calls.append(1))
    checkpointed(pixel_values, noise=noise).loss.backward()
    assert len(calls) == 2  # the block ran again during backward: activations were not kept
    for (name, a), (_, b) in zip(reference.named_parameters(), checkpointed.named_parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_eager_and_sdpa_attention_agree(tmp_path, pixel_values, noise):
    _recipe_model(shortcut_decay=0.3).save_pretrained(tmp_path)
    outputs = {}
    for implementation in ("eager", "sdpa"):
        model = ViTMAEDecayForPreTraining.from_pretrained(tmp_path, attn_implementation=implementation).eval()
        assert model.config._attn_implementation == implementation
        outputs[implementation] = model(pixel_values, noise=noise)
    torch.testing.assert_close(outputs["eager"].logits, outputs["sdpa"].logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs["eager"].loss, outputs["sdpa"].loss, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((2, 1, 32, 32), r"pixel_values must have shape \(batch, 3, 32, 32\).*got \(2, 1, 32, 32\)"),
        ((2, 3, 48, 48), r"image_size=32.*got \(2, 3, 48, 48\).*interpolate_pos_encoding=True"),
        ((3, 32, 32), r"pixel_values must have shape \(batch, 3, 32, 32\)"),
        ((0, 3, 32, 32), r"at least one image, shape \(batch, 3, 32, 32\); got \(0, 3, 32, 32\)"),
    ],
)
def test_bad_pixel_values_get_a_clear_error(shape, message):
    model = _recipe_model()
    for module in (model, model.vit):
        with pytest.raises(ValueError, match=message):
            module(torch.zeros(shape))


@pytest.mark.parametrize("dtype", [torch.float64, torch.uint8, torch.float16])
def test_pixel_values_of_another_dtype_get_a_clear_error(dtype):
    """Raw uint8 images and float64 arrays used to fail deep inside the patch convolution."""
    model = _recipe_model()
    pixel_values = torch.zeros(2, 3, 32, 32, dtype=dtype)
    message = rf"floating-point tensor of dtype torch.float32 \(the model's dtype\); got {dtype}"
    for module in (model, model.vit):
        with pytest.raises(ValueError, match=message):
            module(pixel_values)


def test_pixel_values_follow_the_model_dtype_and_autocast(pixel_values, noise):
    model = _recipe_model()
    expected = model(pixel_values, noise=noise).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast converts the input itself
        loss = model(pixel_values.bfloat16(), noise=noise).loss
    torch.testing.assert_close(loss.float(), expected, atol=0.05, rtol=0.05)
    model.double()
    torch.testing.assert_close(model(pixel_values.double(), noise=noise).loss.float(), expected)


def test_other_resolutions_with_interpolated_positions():
    model = _recipe_model()
    out = model(torch.randn(2, 3, 48, 48), interpolate_pos_encoding=True)
    assert out.logits.shape == (2, 36, TINY["patch_size"] ** 2 * 3)
    with pytest.raises(ValueError, match="multiples of patch_size=8"):
        model(torch.randn(2, 3, 44, 44), interpolate_pos_encoding=True)


def test_save_and_auto_load_round_trip(tmp_path, pixel_values, noise):
    model = _recipe_model(shortcut_decay=0.3, shortcut_schedule="cosine")
    model.save_pretrained(tmp_path)
    files = {path.name for path in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "shortcut.py"} <= files
    assert {"configuration_vit_mae_decay.py", "modeling_vit_mae_decay.py"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    loaded = AutoModelForPreTraining.from_pretrained(tmp_path).eval()
    assert type(loaded) is ViTMAEDecayForPreTraining
    assert loaded.shortcut_coefficients == model.shortcut_coefficients
    torch.testing.assert_close(
        loaded(pixel_values, noise=noise).logits, model(pixel_values, noise=noise).logits
    )
    encoder, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert type(encoder) is ViTMAEDecayModel and info["missing_keys"] == set()
    torch.testing.assert_close(
        encoder.eval()(pixel_values, noise=noise).last_hidden_state,
        model.vit(pixel_values, noise=noise).last_hidden_state,
    )


def _stock_checkpoint(path) -> ViTMAEForPreTraining:
    torch.manual_seed(3)
    stock = ViTMAEForPreTraining(ViTMAEConfig(**TINY)).eval()
    with torch.no_grad():
        stock.decoder.decoder_pos_embed.normal_()
    stock.save_pretrained(path)
    with safe_open(path / "model.safetensors", "pt") as handle:  # stock transformers writes legacy key names
        assert any(".encoder.layer.0.attention.attention.query." in key for key in handle.keys())  # noqa: SIM118 (a safe_open handle, not a dict)
    return stock


def test_retrofit_a_stock_checkpoint(tmp_path, caplog):
    stock = _stock_checkpoint(tmp_path)
    logger = logging.getLogger("hf_resdecay.models.vit_mae_decay.modeling_vit_mae_decay")
    logger.addHandler(caplog.handler)
    try:
        model, info = ViTMAEDecayForPreTraining.from_pretrained(
            tmp_path, shortcut_decay=0.3, output_loading_info=True
        )
    finally:
        logger.removeHandler(caplog.handler)
    new = {name for name, _ in model.named_parameters() if "skip_layers" in name} | {
        "decoder.decoder_cls_token"
    }
    assert info["missing_keys"] == new
    assert info["unexpected_keys"] == {"vit.layernorm.weight", "vit.layernorm.bias", "decoder.mask_token"}
    # upstream's decoder_embed reads the encoder latent (32 -> 16); the recipe's maps the decoder input
    assert {entry[0] for entry in info["mismatched_keys"]} == {"decoder.decoder_embed.weight"}
    assert model.config.shortcut_decay == 0.3 and model.shortcut_coefficients[-1] == pytest.approx(0.7)
    stock_weights = stock.state_dict()
    for name, tensor in model.state_dict().items():
        if name in stock_weights and not name.startswith("decoder.decoder_embed."):
            torch.testing.assert_close(
                tensor, stock_weights[name], msg=name
            )  # zero init did not clobber them
    assert "Retrofitted" in caplog.text and "decoder.skip_layers.0.proj_in.weight" in caplog.text
    assert "decoder.decoder_embed.weight" in caplog.text


def test_retrofit_restarts_a_decoder_embed_of_matching_shape(tmp_path):
    """With equal widths the stock decoder_embed fits the shape but not the role: it must start fresh."""
    torch.manual_seed(4)
    stock = ViTMAEForPreTraining(ViTMAEConfig(**{**TINY, "decoder_hidden_size": TINY["hidden_size"]}))
    stock.save_pretrained(tmp_path)
    model = ViTMAEDecayForPreTraining.from_pretrained(tmp_path, shortcut_decay=0.3)
    assert not torch.equal(model.decoder.decoder_embed.weight, stock.decoder.decoder_embed.weight)
    assert torch.count_nonzero(model.decoder.decoder_embed.bias) == 0
    torch.testing.assert_close(model.vit.layers[0].mlp.fc1.weight, stock.vit.layers[0].mlp.fc1.weight)


def test_other_size_mismatches_still_raise(tmp_path):
    _recipe_model().save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match=r"do not fit.*vit\.layers\.0\.mlp\.fc1\.weight"):
        ViTMAEDecayForPreTraining.from_pretrained(tmp_path, intermediate_size=48)
    model = ViTMAEDecayForPreTraining.from_pretrained(
        tmp_path, intermediate_size=48, ignore_mismatched_sizes=True
    )
    assert model.vit.layers[0].mlp.fc1.weight.shape == (48, TINY["hidden_size"])


def test_stock_checkpoint_with_upstream_settings_is_unchanged(tmp_path, pixel_values, noise):
    stock = _stock_checkpoint(tmp_path)
    model, info = ViTMAEDecayForPreTraining.from_pretrained(
        tmp_path, output_loading_info=True, **UPSTREAM_RECIPE
    )
    assert info["missing_keys"] == info["unexpected_keys"] == set()
    torch.testing.assert_close(
        model.eval()(pixel_values, noise=noise).logits, stock(pixel_values, noise=noise).logits
    )


def test_upstream_class_reads_a_decayed_checkpoint_saved_with_upstream_settings(
    tmp_path, pixel_values, noise
):
    _, ours = _upstream_pair()
    ours.save_pretrained(tmp_path)
    upstream, info = ViTMAEForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == info["unexpected_keys"] == set()
    torch.testing.assert_close(
        upstream.eval()(pixel_values, noise=noise).logits, ours(pixel_values, noise=noise).logits
    )


def test_upstream_parts_replaced_in_init_draw_no_random_numbers():
    """The pretraining model's encoder starts as a lone encoder built from the same seed: upstream's own
    encoder and decoder, built by ``super().__init__`` and then replaced, take nothing from the stream."""
    config = ViTMAEDecayConfig(**TINY)
    torch.manual_seed(0)
    alone = ViTMAEDecayModel(config).state_dict()
    torch.manual_seed(0)
    inside = ViTMAEDecayForPreTraining(config).vit.state_dict()
    assert list(inside) == list(alone)
    assert all(torch.equal(inside[name], alone[name]) for name in alone)


def test_decayed_layers_are_upstream_layers_switched_in_place():
    layer = ViTMAELayer(ViTMAEDecayConfig(**TINY))
    parameters = dict(layer.named_parameters())
    decayed = ViTMAEDecayLayer.decay_(layer, 0.9, 0.8)
    assert decayed is layer and type(layer) is ViTMAEDecayLayer
    assert (layer.attention_alpha, layer.mlp_alpha) == (0.9, 0.8)
    assert all(parameter is parameters[name] for name, parameter in layer.named_parameters())
