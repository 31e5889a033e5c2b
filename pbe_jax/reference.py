"""The PyTorch reference (diffusers + transformers): tiny random Paint-by-Example pipelines for tests and
offline comparisons, and loading a folder's components into PyTorch. Needs the `[torch]` extra."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

# Two deliberately different tiny configurations. "sd" has SD-1.x's structure (conv projections, heads
# given per model, cross-attention on all but the last level); "alt" changes every option the port reads:
# linear projections, per-level heads and layer counts, a plain first level, two transformer layers, other
# norm groups/eps, the time-embedding flip/shift, no VAE mid attention, GELU CLIP with 9 layers (2 mapper
# blocks). Channel counts are small primes times the group count, so transposed shapes cannot line up.
TINY = {
    "sd": {
        "unet": dict(sample_size=16, in_channels=9, out_channels=4, layers_per_block=2,
                     block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
                     attention_head_dim=4, norm_num_groups=8),
        "vae": dict(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                    layers_per_block=1, sample_size=32),
        "image_encoder": dict(hidden_size=40, intermediate_size=56, num_attention_heads=4, num_hidden_layers=5,
                              image_size=28, patch_size=7, projection_dim=24, hidden_act="quick_gelu"),
        "image_size": 32, "reference_size": 28,
    },
    "alt": {
        "unet": dict(sample_size=12, in_channels=9, out_channels=4, layers_per_block=(1, 2, 1),
                     block_out_channels=(24, 36, 48),
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                     cross_attention_dim=20, attention_head_dim=(2, 3, 4), norm_num_groups=6, norm_eps=1e-6,
                     use_linear_projection=True, transformer_layers_per_block=(1, 2, 2),
                     flip_sin_to_cos=False, freq_shift=1),
        "vae": dict(block_out_channels=(12, 18, 24), down_block_types=("DownEncoderBlock2D",) * 3,
                    up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=6,
                    layers_per_block=2, sample_size=48, mid_block_add_attention=False, scaling_factor=0.3),
        "image_encoder": dict(hidden_size=30, intermediate_size=44, num_attention_heads=3, num_hidden_layers=9,
                              image_size=30, patch_size=6, projection_dim=20, hidden_act="gelu",
                              layer_norm_eps=1e-6),
        "image_size": 48, "reference_size": 30,
    },
}


def build_tiny(name: str = "sd", seed: int = 0) -> dict[str, Any]:
    """Random PyTorch components of the tiny configuration `name`. Weights are drawn at a scale that
    makes every layer matter (default inits leave some outputs near zero)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    from diffusers.pipelines.deprecated.paint_by_example.image_encoder import PaintByExampleImageEncoder

    cfg = TINY[name]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg["unet"])
    vae = AutoencoderKL(**cfg["vae"])
    encoder = PaintByExampleImageEncoder(CLIPVisionConfig(**cfg["image_encoder"]))
    with torch.no_grad():
        for module in (unet, vae, encoder):
            for p in module.parameters():
                p.add_(0.05 * torch.randn_like(p))
    size = cfg["reference_size"]
    feature_extractor = CLIPImageProcessor(crop_size={"height": size, "width": size}, size={"shortest_edge": size})
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, num_train_timesteps=1000, set_alpha_to_one=False,
                              steps_offset=1)
    return {"unet": unet.eval(), "vae": vae.eval(), "image_encoder": encoder.eval(), "scheduler": scheduler,
            "feature_extractor": feature_extractor}


def save_tiny(folder: str | Path, name: str = "sd", seed: int = 0) -> Path:
    """A tiny random Paint-by-Example pipeline saved as diffusers' `save_pretrained` lays it out."""
    folder = Path(folder)
    comps = build_tiny(name, seed)
    for key, comp in comps.items():
        comp.save_pretrained(folder / key)
    import json

    index = {"_class_name": "PaintByExamplePipeline", "_diffusers_version": "0.42.0",
             "feature_extractor": ["transformers", "CLIPImageProcessor"],
             "image_encoder": ["paint_by_example", "PaintByExampleImageEncoder"],
             "requires_safety_checker": False, "safety_checker": [None, None],
             "scheduler": ["diffusers", "PNDMScheduler"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def quiet() -> None:
    """Silence the reference libraries' advice (accelerate, config type notices) in tool output."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def disable_tf32() -> None:
    """Full float32 matmuls and convolutions on GPUs, where PyTorch may default to TF32."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def build_full_size(seed: int = 0) -> dict[str, Any]:
    """Random PyTorch networks at full size: SD-1.4 UNet (9 input channels), SD VAE, ViT-L/14 encoder."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPVisionConfig

    from diffusers.pipelines.deprecated.paint_by_example.image_encoder import PaintByExampleImageEncoder
    from pbe_jax.models import CLIPVisionConfig as JaxCLIPConfig, UNetConfig, VAEConfig

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNetConfig().to_dict())
    vae = AutoencoderKL(**VAEConfig().to_dict())
    enc_cfg = {k: v for k, v in JaxCLIPConfig().to_dict().items() if k not in ("architectures", "model_type")}
    encoder = PaintByExampleImageEncoder(CLIPVisionConfig(**enc_cfg))
    return {"unet": unet.eval(), "vae": vae.eval(), "image_encoder": encoder.eval()}


def to_jax(modules: dict[str, Any], policy=None):
    """The JAX port of PyTorch networks, through the same conversion as loading a folder."""
    from pbe_jax.convert.diffusers import PaintByExampleModels, from_state_dict
    from pbe_jax.models import Policy

    out = {}
    for name, m in modules.items():
        config = m.config.to_dict() if hasattr(m.config, "to_dict") else dict(m.config)
        state = {k: v.detach().float().cpu().numpy() for k, v in m.state_dict().items()}
        out[name] = from_state_dict(name, config, state, policy=policy or Policy(), source=f"PyTorch {name}")
    return PaintByExampleModels(**out)


def load_torch(folder: str | Path) -> dict[str, Any]:
    """The three networks of a diffusers folder as PyTorch modules (float32, eval mode)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from diffusers.pipelines.deprecated.paint_by_example.image_encoder import PaintByExampleImageEncoder

    quiet()
    folder = Path(folder)
    return {"unet": UNet2DConditionModel.from_pretrained(folder / "unet").eval(),
            "vae": AutoencoderKL.from_pretrained(folder / "vae").eval(),
            "image_encoder": PaintByExampleImageEncoder.from_pretrained(folder / "image_encoder").eval()}


def torch_pipeline(folder: str | Path, sampler: str = "plms"):
    """diffusers' `PaintByExamplePipeline` built from a folder's components (diffusers cannot resolve the
    image encoder's class from a saved model_index.json), with the folder's PNDM scheduler or, for another
    `sampler`, the diffusers scheduler of that name made from its config with `from_config`, as users swap
    schedulers (DDIM with clip_sample off, DPM-Solver++ 2M and UniPC with their defaults)."""
    from diffusers import PaintByExamplePipeline, PNDMScheduler
    from transformers import CLIPImageProcessor

    quiet()
    folder = Path(folder)
    nets = load_torch(folder)
    scheduler = swap_scheduler(PNDMScheduler.from_pretrained(folder / "scheduler"), sampler)
    pipe = PaintByExamplePipeline(**nets, scheduler=scheduler, safety_checker=None, requires_safety_checker=False,
                                  feature_extractor=CLIPImageProcessor.from_pretrained(folder / "feature_extractor"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def swap_scheduler(pndm, sampler: str):
    """The diffusers scheduler for one of our samplers, made from a PNDM scheduler's config as users swap them:
    PNDM itself for "plms", DDIM with clip_sample off, DPM-Solver++ 2M and UniPC with their defaults."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    if sampler == "plms":
        return pndm
    if sampler == "ddim":
        return DDIMScheduler.from_config(pndm.config, clip_sample=False)
    cls = {"dpmpp_2m": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler}[sampler]
    return cls.from_config(pndm.config)


@contextlib.contextmanager
def posterior_mean():
    """Make the reference pipeline encode the masked image with the posterior mean rather than a sample:
    the two frameworks cannot draw the same noise, so parity runs both with the mean."""
    import diffusers.pipelines.deprecated.paint_by_example.pipeline_paint_by_example as module

    original = module.retrieve_latents
    module.retrieve_latents = lambda output, generator=None, sample_mode="sample": output.latent_dist.mode()
    try:
        yield
    finally:
        module.retrieve_latents = original


def run_torch_pipeline(pipe, image, mask, reference, latents, steps: int, guidance_scale: float) -> Any:
    """The reference pipeline on PIL inputs from the given NCHW initial latents → uint8 NHWC, rounded as
    diffusers' `numpy_to_pil` does."""
    import numpy as np
    import torch
    from PIL import Image

    pil = lambda xs: [Image.fromarray(x) for x in xs]  # noqa: E731
    with posterior_mean(), torch.no_grad():
        out = pipe(example_image=pil(reference), image=pil(image), mask_image=pil(mask),
                   num_inference_steps=steps, guidance_scale=guidance_scale,
                   latents=torch.from_numpy(latents), output_type="np").images
    return (out * 255).round().astype(np.uint8)
