"""The offline default model: Paint by Example on the synthetic world, trained by this project in three
stages on a CPU. The frozen networks first (each stage's export feeds the next), then the paper's recipe
(UNet, mapper, LayerNorm, projection and uncond vector trained; the VAE and the vision tower frozen):

    python train.py --config synthetic --workdir runs/syn_vae mode=vae steps=2500 optim.lr=1e-3 \
        optim.warmup_steps=0
    python train.py --config synthetic --workdir runs/syn_tower mode=tower steps=3000 optim.lr=5e-4 \
        optim.warmup_steps=300 data.batch_size=64
    python train.py --config synthetic --workdir runs/syn steps=10000 \
        model.vae_folder=runs/syn_vae/export/vae model.image_encoder_folder=runs/syn_tower/export/image_encoder
    python -m pbe_jax.convert runs/syn/export checkpoints/synthetic --to diffusers --dtype float16

The paper's ablations are the third command with `bezier_mask_p=0.0` (box masks only) or
`reference_augment=False` (references only resized), in workdirs runs/syn_no_mask_aug and runs/syn_no_ref_aug,
each exported to float16 as above (to runs/syn_no_mask_aug/fp16, runs/syn_no_ref_aug/fp16); `bash
bench/quality_synthetic.sh checkpoints/synthetic runs/quality no_mask_aug=runs/syn_no_mask_aug/fp16
no_ref_aug=runs/syn_no_ref_aug/fp16` puts them in the quality table.

Images are 64² crops of 128² scenes (VAE f = 4: 16² latents); references 32² for a small ViT tower.
docs/synthetic.md has the times these took and what the model scores.
"""
from pbe_jax.train.config import DataConfig, ModelConfig, OptimConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(
            init="components",
            unet=dict(in_channels=9, out_channels=4, block_out_channels=[48, 96, 96], layers_per_block=1,
                      down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                      up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                      attention_head_dim=4, cross_attention_dim=64, norm_num_groups=16),
            vae=dict(block_out_channels=[16, 32, 64], latent_channels=4, norm_num_groups=8, layers_per_block=1,
                     down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                     sample_size=64),
            image_encoder=dict(hidden_size=96, intermediate_size=192, num_attention_heads=4, num_hidden_layers=4,
                               image_size=32, patch_size=4, projection_dim=64),
            dtype="float32",
        ),
        data=DataConfig(source="synthetic", size=20000, image_size=64, scene_size=128, reference_size=32,
                        batch_size=16),
        optim=OptimConfig(lr=5e-4, warmup_steps=200),
        steps=8000,
        ema_decay=0.999,
        log_every=50,
        ckpt_every=1000,
        sample_every=1000,
        sample_steps=25,
    )
