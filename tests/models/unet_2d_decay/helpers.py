"""Tiny UNet2D configurations shared by the decayed-UNet tests."""

import math

TINY = dict(
    sample_size=16,
    block_out_channels=(8, 16),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=4,
    attention_head_dim=4,
)
"""DDPM-style UNet on 16x16 RGB: 12 residual units (8 resnets, 4 attentions)."""

SKIP = dict(
    sample_size=16,
    block_out_channels=(32, 32),
    layers_per_block=1,
    time_embedding_type="fourier",
    down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
    up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D"),
    mid_block_scale_factor=math.sqrt(2.0),
    resnet_time_scale_shift="scale_shift",
    norm_num_groups=8,
    attention_head_dim=8,
)
"""NCSN++-style UNet: FIR skip blocks, Fourier time, scale-shift norms, output scales sqrt(2) (32 channels:
the skip blocks' attentions use 32 groups)."""

RESAMPLE = dict(
    sample_size=16,
    block_out_channels=(8, 16),
    layers_per_block=1,
    down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D"),
    downsample_type="resnet",
    upsample_type="resnet",
    add_attention=False,
    num_class_embeds=3,
    norm_num_groups=4,
    attention_head_dim=4,
)
"""Resnets as down/upsamplers, a mid block without attention, class conditioning."""

CONFIGS = {"tiny": TINY, "skip": SKIP, "resample": RESAMPLE}
"""Between them, every block type UNet2DModel can build and run."""
