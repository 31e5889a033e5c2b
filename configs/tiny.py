"""A tiny Paint-by-Example trained from scratch on procedurally generated scenes, on a laptop CPU.

    python train.py --config tiny --workdir runs/tiny
"""
from pbe_jax.train.config import DataConfig, ModelConfig, OptimConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(
            init="scratch",
            unet=dict(in_channels=9, out_channels=4, block_out_channels=[32, 64], layers_per_block=1,
                      down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                      up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], attention_head_dim=4,
                      cross_attention_dim=32, norm_num_groups=8),
            vae=dict(block_out_channels=[16, 32, 32], latent_channels=4, norm_num_groups=8, layers_per_block=1,
                     down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3),
            image_encoder=dict(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_hidden_layers=4,
                               image_size=32, patch_size=8, projection_dim=32),
            dtype="float32",
        ),
        data=DataConfig(source="synthetic", size=2000, image_size=64, reference_size=32, batch_size=8),
        optim=OptimConfig(lr=3e-4, warmup_steps=100),
        steps=2000,
        log_every=20,
        ckpt_every=250,
        sample_every=500,
    )
