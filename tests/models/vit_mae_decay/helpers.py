"""Tiny ViTMAE configurations shared by the decayed-ViTMAE tests."""

TINY = dict(
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
    decoder_hidden_size=16,
    decoder_num_hidden_layers=3,
    decoder_num_attention_heads=2,
    decoder_intermediate_size=32,
)
"""ViT with 4 blocks on 32x32 images in 8x8 patches (16 patches), decoder with 3 blocks."""

UPSTREAM_RECIPE = dict(
    shortcut_decay=0.0,
    encoder_final_layernorm=True,
    zero_init_residual_branches=False,
    decoder_skip_connections=False,
    initializer="transformers",
    layer_norm_eps=1e-12,
)
"""The decayed config's settings that reproduce upstream ViTMAE exactly (its initialisation and eps too)."""

NUM_PATCHES = (TINY["image_size"] // TINY["patch_size"]) ** 2
