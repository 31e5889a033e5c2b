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


# ---- the training step, as the original release trains ----------------------------------------------------

class TrainingReference:
    """Paint by Example's training step in PyTorch on diffusers/transformers modules, computed as the original
    release's `LatentDiffusion` does (`get_input` for the "inpaint" key, `forward`, `p_losses` with the simple
    L2 loss, `proj_out`, the learnable vector; `configure_optimizers` and `LambdaLinearScheduler`):

    - latents are posterior samples, `scale_factor × (mean + std · ε)`, of the image and of the masked image
      (`image × keep`, the masked region 0 in [-1, 1]), without gradient;
    - the keep mask at latent size is torchvision's `Resize` of the tensor (bilinear, half-pixel, no
      antialiasing in the torchvision 0.12 it trained with);
    - the condition is `proj_out(final_ln(mapper(pooled CLIP)))`, replaced by the learnable vector where
      the drop decision says so; x_t = √ᾱ_t z + √(1 − ᾱ_t) ε with ᾱ from a float64 β schedule, stored as
      float32; the loss the mean of (ε̂ − ε)² over everything (logvar 0, no ELBO term);
    - AdamW (torch's, decoupled weight decay) over the UNet, the mapper, the LayerNorm, the projection and
      the learnable vector; the learning rate × (f_start + (1 − f_start) n / warm-up) at optimiser step n,
      then × 1; clipping by global norm only when asked (the original's trainer sets none).

    Every random draw (masks, augmented references, posterior noise, drop decisions, timesteps, noise) comes
    from the caller, as `pbe_jax.train.step.draw` makes them, NHWC; images in [-1, 1], NHWC."""

    def __init__(self, modules: dict[str, Any], *, lr: float, warmup_steps: int, warmup_start: float,
                 weight_decay: float, b1: float, b2: float, eps: float, clip_norm: float,
                 beta_start: float = 0.00085, beta_end: float = 0.012, beta_schedule: str = "scaled_linear",
                 num_train_timesteps: int = 1000):
        import numpy as np
        import torch

        self.unet, self.vae, self.encoder = modules["unet"], modules["vae"], modules["image_encoder"]
        for m in (self.unet, self.vae, self.encoder):
            m.eval()  # no dropout anywhere; the original's frozen stages are in eval mode too
        for p in (*self.vae.parameters(), *self.encoder.model.parameters()):
            p.requires_grad_(False)
        self.trainable = {**{f"unet.{k}": p for k, p in self.unet.named_parameters()},
                          **{f"image_encoder.{k}": p for k, p in self.encoder.named_parameters()
                             if not k.startswith("model.")}}
        for p in self.trainable.values():
            p.requires_grad_(True)
        if beta_schedule == "scaled_linear":
            betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=np.float64) ** 2
        else:
            betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
        ac = np.cumprod(1.0 - betas)
        self.sqrt_ac = torch.tensor(np.sqrt(ac), dtype=torch.float32)
        self.sqrt_1m_ac = torch.tensor(np.sqrt(1.0 - ac), dtype=torch.float32)
        self.optimizer = torch.optim.AdamW(list(self.trainable.values()), lr=lr, betas=(b1, b2), eps=eps,
                                           weight_decay=weight_decay)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda n: warmup_start + (1.0 - warmup_start) * n / warmup_steps if n < warmup_steps else 1.0)
        self.clip_norm = clip_norm

    def _latent(self, x, noise):
        posterior = self.vae.encode(x).latent_dist
        return self.vae.config.scaling_factor * (posterior.mean + posterior.std * noise)

    def loss(self, image, draws: dict):
        """The loss of one step: `image` (B, H, W, 3) and the draws as numpy arrays."""
        import numpy as np
        import torch
        import torch.nn.functional as F

        def nchw(a):
            return torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32).transpose(0, 3, 1, 2)))

        x = nchw(image)
        keep = 1.0 - torch.tensor(np.asarray(draws["edit"], np.float32))[:, None]
        with torch.no_grad():
            z = self._latent(x, nchw(draws["posterior_noise"]))
            z_inpaint = self._latent(x * keep, nchw(draws["masked_posterior_noise"]))
        mask = F.interpolate(keep, size=z.shape[-2:], mode="bilinear", align_corners=False, antialias=False)
        c = self.encoder(nchw(draws["reference"]))
        drop = torch.tensor(np.asarray(draws["drop"], bool))[:, None, None]
        c = torch.where(drop, self.encoder.uncond_vector.expand(c.shape[0], -1, -1), c)
        t = torch.from_numpy(np.asarray(draws["t"], np.int64))
        noise = nchw(draws["noise"])
        x_t = self.sqrt_ac[t][:, None, None, None] * z + self.sqrt_1m_ac[t][:, None, None, None] * noise
        eps = self.unet(torch.cat([x_t, z_inpaint, mask], dim=1), t, c).sample
        return F.mse_loss(eps, noise)

    def gradients(self, image, draws: dict) -> tuple[float, dict[str, Any]]:
        """The loss and the gradients by parameter name, as numpy views of the `.grad` tensors (valid until the
        next `gradients` or `step`); no optimiser step."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(image, draws)
        loss.backward()
        return float(loss.detach()), {k: p.grad.detach().numpy() for k, p in self.trainable.items()
                                      if p.grad is not None}

    def step(self, image, draws: dict) -> tuple[float, dict[str, Any]]:
        """One optimiser step: the loss and the gradients (before clipping) by parameter name, as numpy."""
        import torch

        loss, grads = self.gradients(image, draws)
        grads = {k: g.copy() for k, g in grads.items()}
        if self.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), self.clip_norm)
        self.optimizer.step()
        self.lr_schedule.step()
        return loss, grads

    def frozen_grads(self) -> list[str]:
        """Names of frozen parameters holding a gradient (none should)."""
        frozen = [("vae." + k, p) for k, p in self.vae.named_parameters()]
        frozen += [("image_encoder." + k, p) for k, p in self.encoder.named_parameters() if k.startswith("model.")]
        return [k for k, p in frozen if p.grad is not None]
