"""Will a sampling program fit in memory? An estimate from the configs, before anything is compiled.

The one term that grows fast is attention on the `xla` backend: it materialises the (tokens × tokens) scores of
every self-attention, per head and per network row, and the UNet's first level has tokens = (H/f)·(W/f) latent
pixels (16 384 for a factor-4 model at 512², so 1 GiB per head and row in float32), twice the rows under
classifier-free guidance. A size whose scores do not fit is refused here with a sentence (`TooLargeError`)
instead of the process being killed by the out-of-memory killer mid-run. The cuDNN flash kernel on GPU and the
Pallas splash kernel on TPU work blockwise and never hold the scores: where every attention takes one of them,
the check has nothing to say and returns None.

What is materialised per score element, per attention call (calibrated, see `tests/test_memory.py`):
- every platform: the logits q·kᵀ in float32 and the softmax's probabilities in the compute dtype, alive
  together inside one attention (`TRANSIENT_BYTES`); the calls run one after another, so the largest counts;
- XLA:CPU in addition keeps the 1/√d scale as a float32 array of the scores' shape, one per distinct shape,
  for the whole program (`CPU_RESIDENT_BYTES`; the `wrapped_broadcast` in the compiled HLO), and runs the
  attention as one fused (YNNPACK) kernel whose internal buffers `compiled.memory_analysis()` does not count.
Measured on the shipped 64² model's UNet (guided, 2 rows, float32, XLA:CPU, jax 0.10.2): at 128² the estimate
of what memory_analysis counts is 43.6 MB against its 43.0 MB of temporaries; the peak resident set size grew
by 4.1 GB at 320² and 8.5 GB at 384², against estimates of 4.1 and 8.4 GB; the same model guided at 512²
extrapolates to about 27 GB (the process in the report was killed at 19 GB, on a 23 GB machine).
Elsewhere than XLA:CPU the estimate is the same arithmetic, not a measurement; the non-attention
activations are a coarse per-pixel term.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from pbe_jax.models.attention import Attention, choose_backend
from pbe_jax.models.unet import ATTENTION_BLOCKS

TRANSIENT_BYTES = 4  # float32 logits per score element, plus the probabilities' itemsize (compute dtype)
CPU_RESIDENT_BYTES = 4  # XLA:CPU's float32 scale array of the scores' shape, one per distinct shape
UNET_ACTIVATIONS = 20  # coarse: values live in the UNet per latent pixel and network row, × block_out_channels[0]
VAE_ACTIVATIONS = 8  # coarse: values live in the VAE per image pixel and row, × its block_out_channels[0]


class TooLargeError(ValueError):
    """A sampling size whose program would not fit in the memory available."""


@dataclasses.dataclass(frozen=True)
class Site:
    """An attention of the sampling program: `rows` × `heads` score matrices of `tokens` × `kv_tokens`, per
    device (each call of it; the calls run one after another)."""

    where: str
    rows: int
    heads: int
    head_dim: int
    tokens: int
    kv_tokens: int
    backend: str  # the implementation it resolves to: "xla" materialises the scores

    @property
    def elements(self) -> int:
        return self.rows * self.heads * self.tokens * self.kv_tokens


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Peak bytes of one device's sampling program (on CPU: of the host, all its devices together).
    `scores`: attention scores (float32 scale arrays kept by XLA:CPU, plus the largest single attention's
    logits and probabilities); `activations`: the rest of the phase (UNet loop or VAE) at its peak, coarse;
    `uncounted`: the part XLA's `memory_analysis()` does not see (XLA:CPU's fused attention kernel allocates its
    logits and probabilities itself); `sites`: the attention calls that materialise scores."""

    scores: int
    activations: int
    uncounted: int
    sites: tuple[Site, ...]

    @property
    def total(self) -> int:
        return self.scores + self.activations

    @property
    def counted(self) -> int:
        """What `compiled.memory_analysis().temp_size_in_bytes` should report for the same program."""
        return self.total - self.uncounted


def resolve(backend: str, platform: str, dtype: Any, head_dim: int, tokens: int, kv_tokens: int) -> str:
    """The implementation the model's attention picks (`attention.choose_backend`), with the platform given;
    "none" for a one-token context (an exact broadcast, no scores)."""
    if kv_tokens == 1:
        return "none"
    return choose_backend(backend, platform=platform, dtype=dtype, head_dim=head_dim, length=tokens,
                          kv_length=kv_tokens)


def _down(h: int, padding: int) -> int:
    """The side after a stride-2 3×3 conv (`Downsample2D`: symmetric `padding`, or 0 = one pixel right/bottom)."""
    return (h + (2 * padding if padding else 1) - 3) // 2 + 1


def attention_sites(unet_config, *, rows: int, height: int, width: int, vae_factor: int, guided: bool, dtype: Any,
                    attention: str = "auto", platform: str = "cpu", vae_config=None,
                    context_tokens: int = 1) -> list[Site]:
    """Every self- and cross-attention of one sampling program for `rows` images of height × width on one
    device: the UNet's (2 × rows when `guided`), and the VAE's mid-block attentions when `vae_config` is given.
    `attention_head_dim` is the number of heads per level, as in SD-1.x configs and this port."""
    cfg = unet_config
    n = len(cfg.block_out_channels)
    net_rows = rows * (2 if guided else 1)
    sides = [(height // vae_factor, width // vae_factor)]
    for _ in range(n - 1):
        sides.append(tuple(_down(s, cfg.downsample_padding) for s in sides[-1]))
    sites = []

    def add(where, level):
        heads, channels = cfg.attention_head_dim[level], cfg.block_out_channels[level]
        tokens = sides[level][0] * sides[level][1]
        for kind, kv in (("self", tokens), ("cross", context_tokens)):
            chosen = resolve(attention, platform, dtype, channels // heads, tokens, kv)
            if chosen != "none":
                sites.append(Site(f"{where} {kind}-attention", net_rows, heads, channels // heads, tokens, kv, chosen))

    for i, kind in enumerate(cfg.down_block_types):
        if kind in ATTENTION_BLOCKS:
            add(f"UNet down level {i}", i)
    add("UNet mid level", n - 1)
    for i, kind in enumerate(cfg.up_block_types):
        level = n - 1 - i
        if kind in ATTENTION_BLOCKS:
            add(f"UNet up level {level}", level)
    if vae_config is not None and vae_config.mid_block_add_attention:
        c = vae_config.block_out_channels[-1]
        tokens = sides[0][0] * sides[0][1]
        chosen = resolve(attention, platform, dtype, c, tokens, tokens)
        sites += [Site(f"VAE {part} mid-block attention", rows, 1, c, tokens, tokens, chosen)
                  for part in ("encoder", "decoder")]
    return sites


def estimate_sampling(unet_config, *, rows: int, height: int, width: int, vae_factor: int, guided: bool,
                      dtype: Any, attention: str = "auto", platform: str = "cpu", devices: int = 1,
                      vae_config=None) -> Estimate:
    """Peak bytes of sampling `rows` images of height × width (all of them: the rows are split over `devices`, as
    the pipeline splits its batch over its mesh), from the configs alone. On GPU and TPU the estimate is per
    device; on CPU, whose devices share the host's memory, it is for all of them together. Without `vae_config`
    the estimate is for the UNet alone."""
    per_device = -(-rows // devices)
    itemsize = jnp.dtype(dtype).itemsize
    kw = {"height": height, "width": width, "vae_factor": vae_factor, "dtype": dtype, "attention": attention,
          "platform": platform, "vae_config": vae_config}
    sites = [s for s in attention_sites(unet_config, rows=per_device, guided=guided, **kw) if s.backend == "xla"]
    transient = TRANSIENT_BYTES + itemsize
    resident = 0
    if platform == "cpu":
        shapes = {(s.rows, s.heads, s.head_dim, s.tokens, s.kv_tokens): s.elements for s in sites}
        resident = CPU_RESIDENT_BYTES * sum(shapes.values())
    latent = (height // vae_factor) * (width // vae_factor)
    phases = [(transient * max((s.elements for s in sites if s.where.startswith("UNet")), default=0),
               UNET_ACTIVATIONS * unet_config.block_out_channels[0] * latent * per_device * (2 if guided else 1)
               * itemsize)]
    if vae_config is not None:
        phases.append((transient * max((s.elements for s in sites if s.where.startswith("VAE")), default=0),
                       VAE_ACTIVATIONS * vae_config.block_out_channels[0] * height * width * per_device * itemsize))
    peak, activations = max(phases, key=sum)
    host = devices if platform == "cpu" else 1
    return Estimate(scores=host * (resident + peak), activations=host * activations,
                    uncounted=host * peak if platform == "cpu" else 0, sites=tuple(sites))


def available_bytes(device: jax.Device | None = None) -> int | None:
    """Memory free for a new program: on an accelerator its allocator's `bytes_limit` less `bytes_in_use`; on
    CPU the host's MemAvailable (or the free physical pages), bounded by the cgroup's limit when one is set.
    None when the device does not say."""
    device = device or jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" not in stats:
            return None
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except OSError:
        pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f, open(usage_file) as g:
                limit, usage = f.read().strip(), int(g.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            free = min(free, int(limit) - usage)
        break
    return free


def attention_backend(module) -> str:
    """The attention backend the layers of `module` (e.g. a UNet) were built with (their `Policy`)."""
    from flax import nnx

    for _, node in nnx.iter_graph(module):
        if isinstance(node, Attention):
            return node.backend
    return "auto"


def _gb(b: int) -> str:
    return f"{b / 1e9:.1f} GB"


def check_sampling_fits(unet_config, *, rows: int, height: int, width: int, vae_factor: int, guided: bool,
                        dtype: Any, attention: str = "auto", devices: Sequence[jax.Device] | None = None,
                        platform: str | None = None, available: int | None = None, vae_config=None,
                        default_size: int | None = None, multiple: int | None = None) -> Estimate | None:
    """Raise `TooLargeError` (one sentence: the size and rows asked, the estimated and the available memory,
    what would fit) when sampling `rows` images of height × width would not fit, before anything is compiled.
    `devices`: those the program runs on (a pipeline's `mesh.devices.flat`; default this process's first);
    `platform` and `available` (bytes per device, or of the host on CPU) override what they say, for tests and
    for programs compiled for other machines. A smaller size offered is a multiple of `multiple` (default
    `vae_factor`) with the aspect ratio asked. Returns the estimate, or None where nothing materialises the
    attention scores (the cudnn or splash kernels everywhere) or the free memory is unknown."""
    devices = list(devices) if devices is not None else [jax.devices()[0]]
    platform = platform or devices[0].platform
    kw = {"unet_config": unet_config, "vae_factor": vae_factor, "dtype": dtype, "attention": attention,
          "platform": platform, "devices": len(devices), "vae_config": vae_config}
    est = estimate_sampling(rows=rows, height=height, width=width, guided=guided, **kw)
    if not est.sites:
        return None
    if available is None:
        available = available_bytes(devices[0])
        if available is None:
            return None
    if est.total <= available:
        return est

    def fits(r, h, w):
        return estimate_sampling(rows=r, height=h, width=w, guided=guided, **kw).total <= available

    f = multiple or vae_factor
    smaller = next(((w2, h2) for w2 in range((width - 1) // f * f, 0, -f)
                    if fits(rows, h2 := max(f, round(height * w2 / width / f) * f), w2)), None)
    fewer = next((r for r in range(rows - 1, 0, -1) if fits(r, height, width)), None)
    where = "per device" if platform != "cpu" else ("on this host" if len(devices) == 1 else
                                                    f"on this host for its {len(devices)} devices")
    advice = []
    if smaller:
        own = f"; the model's own size is {default_size}×{default_size}" if default_size else ""
        advice.append(f"a smaller size (at most {smaller[0]}×{smaller[1]} fits{own})")
    if fewer:
        advice.append(f"fewer images per batch ({fewer} fit{'s' if fewer == 1 else ''})")
    head_dims_ok = all(s.head_dim <= 128 and s.head_dim % 8 == 0 for s in est.sites)
    if head_dims_ok and platform == "gpu":
        half = jnp.dtype(dtype).name in ("bfloat16", "float16")
        advice.append("the cudnn attention backend (attention='cudnn')" if half else
                      "bfloat16, where the cudnn attention backend computes attention without materialising them")
    elif head_dims_ok and platform == "cpu":
        advice.append("a GPU, whose cudnn attention backend does not materialise them")
    guidance = f" ({rows * 2} network rows with classifier-free guidance)" if guided else ""
    todo = (", ".join(advice[:-1]) + " or " + advice[-1] if len(advice) > 1 else advice[0] if advice
            else "a machine with more memory")
    raise TooLargeError(
        f"sampling {width}×{height} with {rows} image{'s' if rows != 1 else ''} per batch{guidance} needs about "
        f"{_gb(est.total)} ({_gb(est.scores)} of it the attention scores that the xla attention backend "
        f"materialises), more than the {_gb(available)} available {where}: use {todo}.")


def check_pipeline_fits(pipe, *, rows: int, height: int, width: int, guided: bool,
                        available: int | None = None) -> Estimate | None:
    """`check_sampling_fits` for a `PaintByExample` pipeline (its UNet and VAE configs, compute dtype, attention
    backend, autoencoder factor, mesh devices and default size): one line in `generate` before it runs."""
    unet = pipe.models.unet
    return check_sampling_fits(unet.config, rows=rows, height=height, width=width, vae_factor=pipe.vae_factor,
                               guided=guided, dtype=unet.dtype, attention=attention_backend(unet),
                               devices=None if pipe.mesh is None else pipe.mesh.devices.flat, available=available,
                               vae_config=pipe.models.vae.config, default_size=pipe.default_size,
                               multiple=pipe.size_multiple)


__all__ = ["Estimate", "Site", "TooLargeError", "attention_backend", "attention_sites", "available_bytes",
           "check_pipeline_fits", "check_sampling_fits", "estimate_sampling", "resolve"]
