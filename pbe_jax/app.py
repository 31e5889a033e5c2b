"""A local web page for editing with an exemplar: paint the region to replace on the photo, give an exemplar,
press Edit (gradio, the `app` extra).

    python -m pbe_jax.app                          # the shipped model, http://127.0.0.1:7860
    python -m pbe_jax.app --pretrained DIR         # any model sample.py takes (folder, single file, Hub id)
    python -m pbe_jax.app --examples my_examples/  # more one-click examples (see --help)

The model is loaded once; its compiled programs are reused across requests (and kept in JAX's persistent
compilation cache, so a restart does not compile them again). One request runs on the device at a time; a
bounded queue holds the others. The page reports progress per denoising step: the sampler's loop calls back to
the host once per step (bench/progress_callback.py measures what that costs).

The edit comes back at the photo's own size. By default ("auto") a photo larger than the model's working size
on a side is edited through a crop around the mask: the mask's box plus a 32-pixel margin, grown to the working
aspect ratio, is edited at the model's full resolution and pasted back through the mask, so the edited region
is not shrunk with the whole photo and everything outside the mask comes back exactly (diffusers'
`padding_mask_crop`). A smaller photo is edited whole.

Scripting it: the `edit` endpoint takes plain images and values and returns the edited image,

    from gradio_client import Client, handle_file
    Client("http://127.0.0.1:7860").predict(handle_file("src.png"), handle_file("mask.png"),
        handle_file("ref.png"), 20, 5.0, 0, "dpmpp_2m", False, "auto", 0, 1.0, api_name="/edit")

(source, mask with white = replace, reference, steps, guidance scale, seed, sampler, keep_unmasked, then the
optional padding_mask_crop: "auto", "off" or a margin in pixels; mask_blur: the feathering radius in the photo's
pixels, default 0; strength: 0 < s ≤ 1, 1 = draw the region anew from noise, the default). Calls that stop
after keep_unmasked get those defaults.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np

# sample.py's, and the library's; plain values, so --help imports no JAX.
from pbe_jax.defaults import (DEFAULT_SAMPLER, DEFAULT_SCALE, DEFAULT_STEPS, ROOT, SAMPLERS, SHIPPED_EXAMPLE,
                              SHIPPED_MODEL)

MAX_SIDE = 4096  # pixels: a larger upload is refused (decoding it alone would take hundreds of MB)
MAX_FILE = "32mb"  # gradio refuses larger uploads before they reach the model
MAX_IMAGES = 4
PAINT = "#ff2d55"  # the brush's colour, at 65 % opacity: visible on white and on dark (the mask is its alpha)
BRUSH = 8  # the brush's radius in the image's pixels (gradio's "auto" is 1/50 of the side: 1 pixel at 64²)
MAX_WORKING_SIZE = 1024
AUTO_CROP_MARGIN = 32  # pixels around the mask's box when "auto" crops (a photo larger than the working size)
MAX_BLUR = 64  # pixels: the mask blur's upper limit

# Small images (the shipped model works at 64²) shown whole and enlarged by whole pixels, not blurred.
CSS = """
#reference img, #edits img, #grid img { image-rendering: pixelated; }
#reference img { width: 100%; height: 100%; object-fit: contain; }
"""

# The editor drops a file the browser cannot decode without a word (it never reaches the server). Such a file is
# handed to a hidden upload button instead, so the server reads it with Pillow: it is shown if Pillow can read it
# (a TIFF, say), and the page says what is wrong with it otherwise.
SOURCE_UPLOAD_JS = """
() => {
  const forward = async (file) => {
    if (!file) return;
    try { (await createImageBitmap(file)).close(); return; } catch (e) {}
    const input = document.querySelector("input[type=file]:has(+ #source_file)");  // the upload button's own
    if (!input) return;
    const files = new DataTransfer();
    files.items.add(file);
    input.files = files.files;
    input.dispatchEvent(new Event("change", {bubbles: true}));
  };
  const inSource = (target) => target instanceof Element && target.closest("#source");
  document.addEventListener("change", (e) => {
    if (inSource(e.target) && e.target.type === "file") forward(e.target.files && e.target.files[0]);
  }, true);
  document.addEventListener("drop", (e) => {
    if (inSource(e.target)) forward(e.dataTransfer && e.dataTransfer.files[0]);
  }, true);
}
"""

log = logging.getLogger("pbe_jax.app")


class InputError(ValueError):
    """Input the page reports as a sentence (never a traceback)."""


# ---- the model side: plain arrays in, arrays out, no gradio -----------------------------------------------

def mask_from_layers(layers: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """The painted region as a mask (float32 (H, W), 1 = replace) at the background's `shape`: every pixel a
    brush left at least half opaque on any layer (the eraser clears them)."""
    from pbe_jax import images

    mask = np.zeros(shape, bool)
    for layer in layers:
        a = np.asarray(layer)
        if a.ndim == 3 and a.shape[-1] == 4:
            painted = (a[..., 3] >= 128).astype(np.float32)
            mask |= (painted if painted.shape == shape else images.resize_mask(painted, shape)) >= 0.5
    return mask.astype(np.float32)


def mask_layer(mask: np.ndarray, colour=(255, 45, 85), opacity: int = 166) -> np.ndarray:
    """A mask (white = replace) as an RGBA editor layer: `colour` at `opacity` where it is white."""
    from pbe_jax import images

    m = images.to_mask(mask) >= 0.5
    layer = np.zeros((*m.shape, 4), np.uint8)
    layer[m] = (*colour, opacity)
    return layer


class Editor:
    """The loaded model and what a request needs: checks with sentences for bad input, one edit at a time."""

    def __init__(self, pretrained: str | Path = SHIPPED_MODEL, *, dtype: str | None = None):
        from pbe_jax import parallel
        from pbe_jax.pipeline import PaintByExample

        self.pretrained = str(pretrained)
        self.pipe = PaintByExample.from_pretrained(pretrained, dtype=dtype, mesh=parallel.data_mesh())
        self.default_size = self.pipe.default_size
        self.factor = self.pipe.vae_factor
        self._lock = threading.Lock()

    def check_image(self, x: Any, what: str, *, mask: bool = False) -> np.ndarray:
        """An uploaded image (array, PIL image or file path) as uint8 RGB, or float mask; InputError if absent,
        unreadable or too large."""
        from pbe_jax import images

        if x is None:
            raise InputError(f"No {what} was given: upload one.")
        try:
            a = images.to_mask(x, what) if mask else images.to_rgb(x, what)
        except images.ImageError as e:
            if isinstance(x, (str, os.PathLike)):  # an upload: name the file, not the server's copy of it
                name = Path(x).name
                reason = str(e.__cause__ or e).replace(str(x), name)
                raise InputError(f"The {what} file {name} is not an image Pillow can read ({reason}); upload a "
                                 "PNG, JPEG or WebP picture.") from None
            raise InputError(f"The {what} is not an image this page can read ({e}).") from None
        h, w = a.shape[:2]
        if max(h, w) > MAX_SIDE:
            raise InputError(f"The {what} is {w}×{h} pixels; the limit is {MAX_SIDE} on a side. Make it smaller "
                             "first.")
        if min(h, w) < 8:
            raise InputError(f"The {what} is {w}×{h} pixels, too small to edit (at least 8 on a side).")
        return a

    def check_size(self, size: Any) -> int | None:
        """The working size override (height = width = size), or None ("auto", empty): chosen by the pipeline,
        the photo's or the crop's aspect ratio at about the model's own pixel count."""
        f = self.factor
        if size is None or (isinstance(size, str) and size.strip().lower() in ("", "auto")):
            return None
        try:
            number = float(size)
        except (TypeError, ValueError):
            number = None
        if number is None or not np.isfinite(number) or number != int(number):
            raise InputError(f'The working size must be "auto" or a whole number of pixels, not {size!r}.')
        size = int(number)
        if size % f or not 2 * f <= size <= MAX_WORKING_SIZE:
            lower, upper = max(2 * f, size // f * f), max(2 * f, -(-size // f) * f)
            hint = f" (try {lower} or {upper})" if lower != upper else ""
            raise InputError(f"This model cannot work at {size}×{size}: the size must be a multiple of {f} (its "
                             f"autoencoder's factor) from {2 * f} to {MAX_WORKING_SIZE}{hint}, or 'auto'. Its own "
                             f"size is {self.default_size}.")
        return size

    def crop_margin(self, value: Any, shape: tuple[int, ...], size: int | None) -> int | None:
        """The pipeline's `padding_mask_crop` for a source of `shape`: "auto" (or empty) crops with a
        AUTO_CROP_MARGIN-pixel margin when the source is larger than the working size (`size`, else the model's
        own) on either side, and not otherwise; "off", "none" or None never crops; a whole number is the margin."""
        if value is None:
            return None
        text = str(value).strip().lower()
        if text in ("", "auto"):
            working = size or self.default_size
            return AUTO_CROP_MARGIN if max(shape[0], shape[1]) > working else None
        if text in ("off", "none"):
            return None
        try:
            return _whole(text, "crop margin", 0, MAX_SIDE)
        except InputError:
            raise InputError(f'The crop margin must be "auto", "off" or a whole number of pixels from 0 to '
                             f"{MAX_SIDE}, not {value!r}.") from None

    def edit(self, source: Any, mask: Any, reference: Any, *, steps: int = DEFAULT_STEPS,
             guidance_scale: float = DEFAULT_SCALE, seed: int = 0, sampler: str = DEFAULT_SAMPLER,
             keep_unmasked: bool = False, num_images: int = 1, size: int | None = None,
             padding_mask_crop: int | str | None = "auto", mask_blur: float = 0.0, strength: float = 1.0,
             on_step: Callable[[int, int], None] | None = None) -> tuple[list[np.ndarray], np.ndarray]:
        """Check the inputs (InputError with a sentence), edit, and return (the edits at the source's own size,
        the source | mask | reference | edits grid). The mask: white (≥ 0.5) = replace. `size`: a working
        size override (height = width = size), None = automatic. `padding_mask_crop`: see `crop_margin`.
        `mask_blur`: the mask's feathering radius in the source's pixels. `strength` (0, 1]: start from the
        source noised to that level; 1 = from pure noise."""
        from pbe_jax import images
        from pbe_jax.diffusion import first_step

        source = self.check_image(source, "source image")
        mask = self.check_image(mask, "mask", mask=True)
        reference = self.check_image(reference, "exemplar (reference image)")
        try:
            mask = images.mask_for_source(mask, source.shape[:2])
        except images.ImageError as e:
            raise InputError(f"The mask does not fit the source image ({e}).") from None
        if not (mask >= 0.5).any():
            raise InputError("No mask was painted: paint over the region to replace with the brush first.")
        if sampler not in SAMPLERS:
            raise InputError(f"Unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}.")
        steps, num_images = _whole(steps, "steps", 1, 1000), _whole(num_images, "number of images", 1, MAX_IMAGES)
        seed = _whole(seed, "seed", 0, 2 ** 32 - num_images)
        guidance_scale = _number(guidance_scale, "guidance scale")
        if not 0 <= guidance_scale <= 50:
            raise InputError(f"The guidance scale must be from 0 to 50, not {guidance_scale:g}.")
        mask_blur = _number(mask_blur, "mask blur")
        if not 0 <= mask_blur <= MAX_BLUR:
            raise InputError(f"The mask blur must be from 0 to {MAX_BLUR} pixels, not {mask_blur:g}.")
        strength = _number(strength, "strength")
        try:  # the sampler's own rule (diffusers' get_timesteps: the last int(steps · strength) steps are run)
            first_step(steps, strength)
        except ValueError as e:
            raise InputError(f"The {e}.") from None
        size = self.check_size(size)
        margin = self.crop_margin(padding_mask_crop, source.shape, size)
        with self._lock:  # one request on the device at a time (gradio's queue also runs them one by one)
            results = self.pipe(source, mask, reference, steps=steps, guidance_scale=guidance_scale, seed=seed,
                                sampler=sampler, height=size, width=size, padding_mask_crop=margin,
                                mask_blur=mask_blur, strength=strength, num_images_per_reference=num_images,
                                keep_unmasked=bool(keep_unmasked), on_step=on_step)
        # photo-sized edits shrunk in the grid (the gallery has them whole), small ones enlarged by whole pixels
        return list(results), images.edit_grid(source, mask, reference, results)


def _number(value: Any, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"The {what} must be a number, not {value!r}.") from None
    if not np.isfinite(number):
        raise InputError(f"The {what} must be a finite number, not {value!r}.")
    return number


def _whole(value: Any, what: str, low: int, high: int) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = None
    if number is None or not (np.isfinite(number) and number == int(number) and low <= number <= high):
        raise InputError(f"The {what} must be a whole number from {low} to {high}, not {value!r}.")
    return int(number)


# ---- examples ----------------------------------------------------------------------------------------------

def find_examples(folders: list[str | Path]) -> list[tuple[Path, Path, Path]]:
    """(source, mask, reference) files: a folder holding source.png, mask.png and reference.png (the shipped
    example's layout) is one example; any other folder or .jsonl is read as `sample.py --batch` reads it (a
    manifest, or source/ mask/ reference/ subfolders)."""
    from pbe_jax import batch

    out = []
    for folder in folders:
        folder = Path(folder)
        single = [folder / f"{name}.png" for name in ("source", "mask", "reference")]
        if all(p.is_file() for p in single):
            out.append(tuple(single))
            continue
        try:
            jobs = batch.load_jobs(str(folder))
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: --examples {folder}: {e}") from None
        out += [(Path(str(j.source)), Path(str(j.mask)), Path(str(j.reference))) for j in jobs]
    return out


def example_rows(examples: list[tuple[Path, Path, Path]], folder: Path) -> list[list]:
    """Rows for gr.Examples: the editor's value (the source as background, the mask as a painted layer, written
    as PNGs into `folder`) and the reference."""
    from pbe_jax import images

    rows = []
    for i, (source, mask, reference) in enumerate(examples):
        rgb = images.to_rgb(images.load_image(source))
        m = images.resize_mask(images.to_mask(images.load_image(mask)), rgb.shape[:2])
        layer = folder / f"example_{i}_mask_layer.png"
        images.save_png(mask_layer(m), layer)
        rows.append([{"background": str(source), "layers": [str(layer)], "composite": None}, str(reference)])
    return rows


# ---- the page ---------------------------------------------------------------------------------------------

def decode_upload(component, payload) -> Any:
    """What `component` hands an event handler for `payload`, as gradio's preprocessing makes it, for a handler
    of an event with preprocess=False. An image upload Pillow cannot decode is handed over as its file path
    (gradio would stop the request with its internal message), so that the page's check names the file in a
    sentence."""
    import gradio as gr

    if payload is None:
        return None
    data = component.data_model.model_validate(payload, context={"validate_meta": True})
    try:
        return component.preprocess(data)
    except gr.Error:
        raise
    except Exception:
        path = getattr(data, "path", None)
        if path is None:
            raise
        return path


def build(editor: Editor, examples: list[tuple[Path, Path, Path]] = (), *, max_queue: int = 16):
    """The gradio Blocks of the page, queued (one request at a time, at most `max_queue` waiting)."""
    import gradio as gr

    workdir = Path(tempfile.mkdtemp(prefix="pbe_jax_app_"))
    rows = example_rows(list(examples), workdir)

    def run(on_step, *args, **kwargs):
        try:
            return editor.edit(*args, on_step=on_step, **kwargs)
        except InputError as e:
            raise gr.Error(str(e), print_exception=False) from None
        except Exception as e:  # the page shows a sentence, the console the traceback
            log.exception("edit failed")
            raise gr.Error(f"The edit failed: {type(e).__name__}: {e}", print_exception=False) from None

    def reporter(progress):
        def on_step(done: int, total: int) -> None:
            progress((done, total), desc="denoising", unit="steps")

        return on_step

    def edit_page(painted_data, reference_data, sampler, steps, scale, seed, num_images, keep, size, crop, blur,
                  strength, progress=gr.Progress()):
        # preprocess=False (the click below): the images are decoded here, the settings arrive as plain values
        source, exemplar = decode_upload(painted, painted_data), decode_upload(reference, reference_data)
        if source is None or source.get("background") is None:
            raise gr.Error("No source image was given: upload one, then paint the region to replace.",
                           print_exception=False)
        background = np.asarray(source["background"])
        mask = mask_from_layers(source.get("layers") or [], background.shape[:2])
        progress(0, desc="starting (the first request with new settings compiles the sampler)")
        return run(reporter(progress), background, mask, exemplar, steps=steps, guidance_scale=scale, seed=seed,
                   sampler=sampler, keep_unmasked=keep, num_images=num_images, size=size, padding_mask_crop=crop,
                   mask_blur=blur, strength=strength)

    def source_upload(path):
        """A source file the browser could not show (SOURCE_UPLOAD_JS): Pillow's reading of it, or a sentence."""
        try:
            return editor.check_image(path, "source image")
        except InputError as e:
            raise gr.Error(str(e), print_exception=False) from None

    def edit_api(source, mask, reference, steps, guidance_scale, seed, sampler, keep_unmasked,
                 padding_mask_crop="auto", mask_blur=0.0, strength=1.0):
        results, _ = run(None, source, mask, reference, steps=steps, guidance_scale=guidance_scale, seed=seed,
                         sampler=sampler, keep_unmasked=keep_unmasked, padding_mask_crop=padding_mask_crop,
                         mask_blur=mask_blur, strength=strength)
        return results[0]

    with gr.Blocks(title="Paint by Example (JAX)") as demo:
        gr.Markdown(
            "## Paint by Example, in JAX\n"
            "Upload a photo, **paint over the region to replace** with the brush (the eraser takes paint off), "
            "give an **exemplar** of what should be there, and press **Edit**. "
            f"Model: `{_short(editor.pretrained)}`, working size about {editor.default_size}×{editor.default_size} "
            "pixels; the edit comes back at the photo's own size.")
        with gr.Row():
            with gr.Column():
                painted = gr.ImageEditor(
                    label="Source: paint the region to replace", type="numpy", image_mode="RGBA",
                    sources=["upload", "clipboard"], format="png", layers=False, transforms=[],
                    brush=gr.Brush(default_size=BRUSH, colors=[(PAINT, 0.65)], color_mode="fixed"),
                    eraser=gr.Eraser(), height=420, elem_id="source")
            with gr.Column():
                reference = gr.Image(label="Exemplar", type="numpy", image_mode="RGB", format="png", height=420,
                                     sources=["upload", "clipboard"], elem_id="reference")
        source_file = gr.UploadButton(type="filepath", file_count="single", visible="hidden", elem_id="source_file")
        with gr.Accordion("Settings", open=False, elem_id="settings"):
            with gr.Row():
                sampler = gr.Dropdown(list(SAMPLERS), value=DEFAULT_SAMPLER, label="Sampler")
                steps = gr.Slider(1, 100, value=DEFAULT_STEPS, step=1, label="Steps")
                scale = gr.Slider(0, 15, value=DEFAULT_SCALE, step=0.5, label="Guidance scale")
            with gr.Row():
                seed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
                num_images = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Number of images")
                keep = gr.Checkbox(value=False, label="Keep the unmasked part of the source exactly")
            with gr.Row():
                side = f"{editor.default_size}×{editor.default_size}"
                crop = gr.Dropdown(
                    ["auto", "off", "0", "16", "32", "64", "128"], value="auto", allow_custom_value=True,
                    label="Crop to the mask (margin in pixels)",
                    info=f"auto: a photo larger than {side} is edited in a crop around the mask ({AUTO_CROP_MARGIN}-"
                         "pixel margin) at the model's full resolution instead of being shrunk whole, and the rest "
                         "of it comes back exactly. off: the whole photo. A number: crop with that margin.")
                blur = gr.Slider(0, MAX_BLUR, value=0, step=0.5, label="Mask blur (pixels)",
                                 info="Feathers the mask's edge (a Gaussian of this radius in the photo's pixels).")
                strength = gr.Slider(0.05, 1, value=1, step=0.05, label="Strength",
                                     info="1: the masked region is drawn anew; less starts from the photo, noised, "
                                          "and keeps more of it.")
                size = gr.Dropdown(["auto", str(editor.default_size)], value="auto", allow_custom_value=True,
                                   label="Working size", info=f"auto: the photo's (or crop's) aspect ratio at about "
                                   f"{side} pixels. A number N: N×N, a multiple of {editor.factor}.")
        button = gr.Button("Edit", variant="primary", elem_id="edit")
        gallery = gr.Gallery(label="Edits", columns=MAX_IMAGES, height=320, object_fit="contain", format="png",
                             preview=False, fit_columns=False, buttons=["download"], elem_id="edits")
        grid = gr.Image(label="source | mask | exemplar | edits", format="png", elem_id="grid")
        if rows:
            gr.Examples(rows, inputs=[painted, reference], label="Examples (click to load)")
        button.click(edit_page, [painted, reference, sampler, steps, scale, seed, num_images, keep, size, crop,
                                 blur, strength], [gallery, grid], api_name=False, concurrency_id="device",
                     preprocess=False)
        source_file.upload(source_upload, source_file, painted, api_name=False)
        demo.load(None, js=SOURCE_UPLOAD_JS)

        with gr.Row(visible=False):  # the scripting endpoint: plain images and values in, the edit out
            # files, read here: an upload that is no image gets this page's sentence, not gradio's preprocessing
            # error; the labels name the endpoint's parameters
            api_in = [gr.File(label="source", type="filepath"), gr.File(label="mask", type="filepath"),
                      gr.File(label="reference", type="filepath"),
                      gr.Number(value=DEFAULT_STEPS, precision=0, label="steps"),
                      gr.Number(value=DEFAULT_SCALE, label="guidance_scale"),
                      gr.Number(value=0, precision=0, label="seed"),
                      gr.Dropdown(list(SAMPLERS), value=DEFAULT_SAMPLER, label="sampler"),
                      gr.Checkbox(value=False, label="keep_unmasked"),
                      gr.Textbox(value="auto", label="padding_mask_crop"),
                      gr.Number(value=0, label="mask_blur"),
                      gr.Number(value=1.0, label="strength")]
            api_out = gr.Image(type="numpy", format="png", label="edit")
            api_button = gr.Button()
        api_button.click(edit_api, api_in, api_out, api_name="edit", concurrency_id="device")
    demo.queue(default_concurrency_limit=1, max_size=max_queue)
    return demo


def _short(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return path


def build_parser() -> argparse.ArgumentParser:
    from pbe_jax import compile_cache

    p = argparse.ArgumentParser(prog="python -m pbe_jax.app", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", default=str(SHIPPED_MODEL),
                   help="model folder, checkpoint, single file (model.ckpt, .safetensors) or Hub id (default: the "
                        "shipped synthetic model)")
    p.add_argument("--examples", action="append", default=[], metavar="DIR",
                   help="more examples for the gallery (repeatable): a folder with source.png, mask.png and "
                        "reference.png, or a manifest / COCOEE-layout folder as sample.py --batch takes")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 opens it to the "
                        "network)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also make a public gradio.live link (off by default)")
    p.add_argument("--max-queue", type=int, default=16, help="requests that may wait (default 16); more are refused")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="compute dtype (default: bfloat16 on GPU/TPU, float32 on CPU)")
    compile_cache.add_argument(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        print('error: the app needs gradio: pip install -e ".[app]"', file=sys.stderr)
        return 1
    from pbe_jax import compile_cache

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    compile_cache.enable(args.compile_cache)
    examples = find_examples([SHIPPED_EXAMPLE, *args.examples])
    try:
        editor = Editor(args.pretrained, dtype=args.dtype)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    demo = build(editor, examples, max_queue=args.max_queue)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, max_file_size=MAX_FILE,
                show_error=True, css=CSS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
