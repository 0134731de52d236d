"""torch.compile and activation checkpointing of the decayed ViTMAE: train mode, the released recipe."""

import pytest
import torch

from hf_resdecay import ViTMAEDecayConfig, ViTMAEDecayForPreTraining, ViTMAEDecayModel

SMALL = dict(
    image_size=16,
    patch_size=4,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    decoder_hidden_size=16,
    decoder_num_hidden_layers=1,
    decoder_num_attention_heads=2,
    decoder_intermediate_size=32,
)
"""Small enough for dynamo to trace in seconds; with the recipe's defaults (decay 0.3, skips, no final LN)."""


def _model(cls: type, **overrides) -> torch.nn.Module:
    """A recipe model in train mode with non-zero branch weights, so every path carries gradient."""
    torch.manual_seed(0)
    config = ViTMAEDecayConfig(**{**SMALL, "zero_init_residual_branches": False, **overrides})
    assert config.shortcut_decay == 0.3 and config.decoder_skip_connections
    assert not config.encoder_final_layernorm
    return cls(config).train()


def _inputs(batch_size: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    num_patches = (SMALL["image_size"] // SMALL["patch_size"]) ** 2
    return {
        "pixel_values": torch.randn(
            batch_size, 3, SMALL["image_size"], SMALL["image_size"], generator=generator
        ),
        "noise": torch.rand(batch_size, num_patches, generator=generator),
    }


def _loss_and_gradients(
    model: torch.nn.Module, forward: torch.nn.Module | None = None, **inputs
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of ``forward`` (the model itself by default) and the gradients it leaves on ``model``."""
    model.zero_grad(set_to_none=True)
    loss = (model if forward is None else forward)(**inputs).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (ViTMAEDecayForPreTraining, {}),
        (ViTMAEDecayModel, {}),
        (ViTMAEDecayModel, {"output_hidden_states": True}),
    ],
    ids=["pretraining-loss", "encoder", "encoder-hidden-states"],
)
def test_train_forward_compiles_to_one_graph(cls, kwargs):
    """The first compiled call must not break the graph: the skips read the encoder's hidden states, which
    transformers collects with hooks it used to install lazily under a lock that dynamo cannot trace."""
    model = _model(cls)
    explanation = torch._dynamo.explain(model)(**_inputs(), **kwargs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_loss_and_gradients_match_eager():
    inputs = _inputs()
    eager_loss, eager_grads = _loss_and_gradients(_model(ViTMAEDecayForPreTraining), **inputs)
    model = _model(ViTMAEDecayForPreTraining)
    compiled = torch.compile(model, backend="aot_eager")
    compiled_loss, compiled_grads = _loss_and_gradients(model, compiled, **inputs)
    torch.testing.assert_close(compiled_loss, eager_loss, atol=1e-6, rtol=1e-6)
    assert compiled_grads.keys() == eager_grads.keys()
    assert any(name.startswith("decoder.skip_layers.") for name in compiled_grads)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("enable", ["activation_checkpointing_enable", "gradient_checkpointing_enable"])
def test_checkpointing_recomputes_every_layer_with_the_same_loss_and_gradients(enable):
    """Encoder blocks, decoder blocks and the encoder-to-decoder skip layers all run again in backward."""
    inputs = _inputs()
    overrides = dict(num_hidden_layers=4, decoder_num_hidden_layers=3)  # two skip layers, one plain block
    reference_loss, reference_grads = _loss_and_gradients(
        _model(ViTMAEDecayForPreTraining, **overrides), **inputs
    )

    model = _model(ViTMAEDecayForPreTraining, **overrides)
    if enable == "gradient_checkpointing_enable":
        with pytest.warns(FutureWarning):  # transformers 5.x keeps the old name as a deprecated alias
            model.gradient_checkpointing_enable()
    else:
        model.activation_checkpointing_enable()
    decoder = model.decoder
    watched = {
        "encoder block 0": model.vit.layers[0].layernorm_before,
        "encoder block 3": model.vit.layers[3].layernorm_before,
        "skip layer 0": decoder.skip_layers[0].proj_in,
        "skip layer 1": decoder.skip_layers[1].proj_in,
        "decoder block 0": decoder.decoder_layers[0].layernorm_before,
        "decoder block 2": decoder.decoder_layers[2].layernorm_before,
    }
    calls = dict.fromkeys(
        watched, 0
    )  # each an early submodule: the recompute stops after the last saved tensor
    for name, module in watched.items():
        module.register_forward_hook(lambda *args, name=name: calls.__setitem__(name, calls[name] + 1))
    loss, grads = _loss_and_gradients(model, **inputs)

    assert calls == dict.fromkeys(watched, 2)  # once forward, once recomputed: activations were not kept
    torch.testing.assert_close(loss, reference_loss, atol=1e-6, rtol=0)
    assert grads.keys() == reference_grads.keys()
    for name, grad in reference_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
