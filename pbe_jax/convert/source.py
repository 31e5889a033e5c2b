"""Where a model's networks come from: the settings `convert.build_models` reads. Import-light (no JAX), so
that the training config (`train.config.ModelConfig`, which adds what trains) can build on it."""
from __future__ import annotations

import dataclasses

INITS = ("sd", "pbe", "components", "scratch")


@dataclasses.dataclass(frozen=True)
class ModelSource:
    # "sd" (SD v1.x: sd_folder or sd_file, + a CLIP vision folder), "pbe" (a Paint-by-Example pbe_folder or the
    # original release's pbe_file), "components" (pretrained vae/ and image_encoder/ component folders, UNet
    # from scratch), "scratch"
    init: str = "scratch"
    sd_folder: str = ""
    sd_file: str = ""  # an SD v1 single file: sd-v1-4.ckpt, v1-5-pruned-emaonly.safetensors
    clip_folder: str = ""
    pbe_folder: str = ""
    pbe_file: str = ""  # the original release's model.ckpt
    ema: bool = True  # a single file's EMA weights, when it has them
    vae_folder: str = ""
    image_encoder_folder: str = ""
    unet: dict = dataclasses.field(default_factory=dict)  # config.json keys, for "scratch"
    vae: dict = dataclasses.field(default_factory=dict)
    image_encoder: dict = dataclasses.field(default_factory=dict)
    dtype: str = "bfloat16"  # compute
    attention: str = "auto"

    @classmethod
    def pretrained(cls, path, **settings) -> "ModelSource":
        """A Paint-by-Example folder (diffusers layout or this project's checkpoint) or single file."""
        from pbe_jax import storage

        path = storage.path(path)
        return cls(init="pbe", **{"pbe_folder" if path.is_dir() else "pbe_file": str(path)}, **settings)

    def weights(self) -> str:
        """The folder or single file that init=sd|pbe starts from (exactly one of the two must be given)."""
        if self.init not in ("sd", "pbe"):
            raise ValueError(f"model.init={self.init} starts from no single folder or file")
        folder, file = (self.sd_folder, self.sd_file) if self.init == "sd" else (self.pbe_folder, self.pbe_file)
        if bool(folder) == bool(file):
            raise ValueError(f"model.init={self.init} needs one of model.{self.init}_folder and model.{self.init}"
                             f"_file" + (f", not both ({folder}, {file})" if folder else ""))
        return folder or file


__all__ = ["INITS", "ModelSource"]
