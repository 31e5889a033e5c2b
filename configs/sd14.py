"""The paper's setting: SD v1.4 initialisation, CLIP ViT-L/14 tower, 512², AdamW 1e-5 with 10k warm-up,
condition dropped with p = 0.2, bf16 compute over float32 parameters.

    python train.py --config sd14 --workdir runs/sd14 \\
        model.sd_folder=/data/stable-diffusion-v1-4 model.clip_folder=/data/clip-vit-large-patch14 \\
        data.source=tfds data.name=open_images_v4 data.data_dir=/data/tfds data.workers=16

Instead of model.sd_folder, an SD v1 single file: model.sd_file=sd-v1-4.ckpt (its EMA weights when it has
them; model.ema=False for the others). To fine-tune the original release: model.init=pbe
model.pbe_file=model.ckpt.

The paper trained with batch 64 on 8 GPUs for 40 epochs of OpenImages; set data.batch_size and steps to
match your hardware. On one 24 GB card: data.batch_size=1 model.remat=True model.frozen_dtype=bfloat16.
"""
from pbe_jax.train.config import DataConfig, ModelConfig, OptimConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(init="sd", dtype="bfloat16", frozen_dtype="bfloat16", remat=False),
        data=DataConfig(source="tfds", name="open_images_v4", image_size=512, reference_size=224, batch_size=64,
                        workers=8),
        optim=OptimConfig(lr=1e-5, warmup_steps=10000),
        steps=200000,
        ema_decay=0.0,
        log_every=50,
        ckpt_every=2000,
        sample_every=5000,
    )
