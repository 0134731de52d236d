"""Tiny DiT configurations shared by the decayed-DiT tests."""

TINY = dict(
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=4,
    out_channels=8,
    num_layers=4,
    sample_size=8,
    patch_size=2,
    norm_num_groups=4,
)
"""DiT with 4 blocks (8 sublayers, 2 long skips) on 8x8 4-channel latents in 2x2 patches, learned sigma."""

UPSTREAM = dict(shortcut_decay=0.0, long_skip_connections=False)
"""The decayed model's settings that reproduce upstream DiTTransformer2DModel exactly."""
