"""The web app (python -m pbe_jax.app): its checks with sentences for bad input (files that are no image
included), the mask read from the painted layers, the editing settings (crop to the mask by default for photos,
mask blur, strength) as the pipeline's arguments, a photo-sized edit, and the page itself served with the shipped
model: driven in a real browser (Debian's chromium through Playwright: upload, paint a stroke, Edit, read the
result back) and scripted through gradio_client's `edit` endpoint."""
import inspect
import io
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pbe_jax import app, defaults, images

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "synthetic"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Chromium as root, offline: no sandbox, no background connections (refused here, many at a time)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def example(name):
    return np.asarray(Image.open(EXAMPLE / f"{name}.png"))


# ---- no server ----------------------------------------------------------------------------------------------

def test_mask_from_painted_layers():
    layer = np.zeros((16, 16, 4), np.uint8)
    layer[2:6, 3:9] = (255, 255, 255, 191)  # painted
    layer[8:10, 8:10] = (255, 255, 255, 100)  # a faint edge of a stroke: under half opaque
    erased = np.zeros((16, 16, 4), np.uint8)
    mask = app.mask_from_layers([layer, erased, np.zeros((16, 16, 3), np.uint8)], (16, 16))
    expected = np.zeros((16, 16), np.float32)
    expected[2:6, 3:9] = 1
    np.testing.assert_array_equal(mask, expected)
    # a layer at another size than the background is resized onto it
    assert app.mask_from_layers([layer], (32, 32))[4:12, 6:18].all()
    # an example's mask becomes a layer that reads back as the same mask
    np.testing.assert_array_equal(app.mask_from_layers([app.mask_layer(example("mask"))], (64, 64)),
                                  (example("mask") >= 128).astype(np.float32))


@pytest.fixture(scope="module")
def editor():
    return app.Editor()


@pytest.mark.parametrize("change, message", [
    (dict(mask=np.zeros((64, 64), np.uint8)), "No mask was painted"),
    (dict(reference=None), r"No exemplar \(reference image\) was given"),
    (dict(source=np.zeros((4100, 20, 3), np.uint8)), "is 20×4100 pixels; the limit is 4096 on a side"),
    (dict(reference=np.zeros((5, 40, 3), np.uint8)), "too small to edit"),
    (dict(source="NOT_AN_IMAGE"), "^The source image file notes.png is not an image Pillow can read "
                                  r"\(cannot identify image file 'notes.png'\)"),
    (dict(reference="NOT_AN_IMAGE"), r"^The exemplar \(reference image\) file notes.png is not an image Pillow "
                                     "can read"),
    (dict(mask=np.zeros((32, 48), np.uint8)), "The mask does not fit the source image .*another aspect ratio"),
    (dict(size=98), "cannot work at 98×98: the size must be a multiple of 4 .* from 8 to 1024 \\(try 96 or 100\\)"),
    (dict(size="big"), 'working size must be "auto" or a whole number of pixels'),
    (dict(size=64.5), 'working size must be "auto" or a whole number of pixels'),
    (dict(steps=0), "steps must be a whole number from 1 to 1000"),
    (dict(num_images=9), "number of images must be a whole number from 1 to 4"),
    (dict(guidance_scale=-1), "guidance scale must be from 0 to 50"),
    (dict(sampler="euler"), "Unknown sampler 'euler'"),
    (dict(padding_mask_crop="wide"), 'crop margin must be "auto", "off" or a whole number of pixels'),
    (dict(padding_mask_crop=-8), 'crop margin must be "auto", "off" or a whole number of pixels'),
    (dict(mask_blur=-1), "mask blur must be from 0 to 64 pixels"),
    (dict(strength=0), r"The strength must be in \(0, 1\], not 0"),
    (dict(strength="most"), "strength must be a number"),
    (dict(strength=0.04, steps=20), "The strength 0.04 of 20 steps leaves no step to run"),
])
def test_bad_input_is_a_sentence(editor, tmp_path, change, message):
    inputs = dict(source=example("source"), mask=example("mask"), reference=example("reference"))
    for part in ("source", "reference"):
        if isinstance(change.get(part), str):  # a file that is no image, as an upload reaches the editor
            (tmp_path / "notes.png").write_text("not an image")
            change = {**change, part: str(tmp_path / "notes.png")}
    inputs.update(change)
    images = {k: inputs.pop(k) for k in ("source", "mask", "reference")}
    with pytest.raises(app.InputError, match=message) as e:
        editor.edit(images["source"], images["mask"], images["reference"], **inputs)
    assert "\n" not in str(e.value)


def test_an_upload_that_is_no_image_reaches_the_page_check(tmp_path):
    """The page decodes its image inputs itself (preprocess=False): gradio's decoding would stop a file Pillow
    cannot read with its own message ("Could not preprocess input component ..."); here it reaches
    `Editor.check_image` as its path, and a good file decodes as gradio decodes it."""
    import gradio as gr

    exemplar = gr.Image(type="numpy", image_mode="RGB", format="png")
    (tmp_path / "notes.png").write_text("not an image")
    assert app.decode_upload(exemplar, {"path": str(tmp_path / "notes.png"), "orig_name": "notes.png"}) == str(
        tmp_path / "notes.png")
    shutil.copy(EXAMPLE / "reference.png", tmp_path / "reference.png")
    decoded = app.decode_upload(exemplar, {"path": str(tmp_path / "reference.png"), "orig_name": "reference.png"})
    np.testing.assert_array_equal(decoded, example("reference"))
    assert app.decode_upload(exemplar, None) is None


def test_crop_to_the_mask_by_default_only_for_photos_larger_than_the_working_size(editor):
    ds = editor.default_size
    assert editor.crop_margin("auto", (ds, ds, 3), None) is None  # edited whole, as before
    assert editor.crop_margin("auto", (120, 200, 3), None) == app.AUTO_CROP_MARGIN
    assert editor.crop_margin("", (ds + 1, 8, 3), None) == app.AUTO_CROP_MARGIN
    assert editor.crop_margin("auto", (120, 200, 3), 256) is None  # a working size override the photo fits
    assert editor.crop_margin("off", (120, 200, 3), None) is None
    assert editor.crop_margin(None, (120, 200, 3), None) is None  # the pipeline's None: no crop
    assert editor.crop_margin("16", (8, 8, 3), None) == 16 and editor.crop_margin(0, (8, 8, 3), None) == 0


def test_the_settings_reach_the_pipeline(editor, monkeypatch):
    """The page's settings as the pipeline's arguments: "auto" size is height = width = None, a size N is N×N,
    the crop margin, mask blur and strength as given."""
    calls = []

    def pipe(source, mask, reference, **kwargs):
        calls.append(kwargs)
        return np.repeat(source[None], kwargs["num_images_per_reference"], axis=0)

    monkeypatch.setattr(editor, "pipe", pipe)
    source, mask = np.zeros((120, 200, 3), np.uint8), np.zeros((120, 200), np.uint8)
    mask[40:70, 120:160] = 255
    editor.edit(source, mask, example("reference"))
    assert {k: calls[-1][k] for k in ("height", "width", "padding_mask_crop", "mask_blur", "strength")} == dict(
        height=None, width=None, padding_mask_crop=app.AUTO_CROP_MARGIN, mask_blur=0.0, strength=1.0)
    assert (calls[-1]["sampler"], calls[-1]["steps"], calls[-1]["guidance_scale"]) == (
        defaults.DEFAULT_SAMPLER, defaults.DEFAULT_STEPS, defaults.DEFAULT_SCALE)
    editor.edit(source, mask, example("reference"), size="96", padding_mask_crop="off", mask_blur="2.5",
                strength=0.5, num_images=2)
    assert {k: calls[-1][k] for k in ("height", "width", "padding_mask_crop", "mask_blur", "strength")} == dict(
        height=96, width=96, padding_mask_crop=None, mask_blur=2.5, strength=0.5)


def test_the_grid_of_a_photo_is_shrunk_to_a_sane_height():
    photo = np.zeros((800, 1200, 3), np.uint8)
    mask = np.zeros((800, 1200), np.float32)
    grid = images.edit_grid(photo, mask, example("reference"), [photo, photo])
    assert grid.shape[0] == defaults.GRID_MAX_HEIGHT and grid.shape[1] < 5 * 1200 * defaults.GRID_MAX_HEIGHT / 800
    small = images.edit_grid(example("source"), mask[:64, :64], example("reference"), [example("source")])
    assert small.shape[0] == 256  # a 64² edit enlarged by whole pixels (4×)


def test_the_page_has_sample_pys_defaults():
    """The page's and the scripting endpoint's defaults are pbe_jax.defaults' own, as sample.py's are."""
    params = inspect.signature(app.Editor.edit).parameters
    assert params["sampler"].default is defaults.DEFAULT_SAMPLER and params["steps"].default is defaults.DEFAULT_STEPS
    assert params["guidance_scale"].default is defaults.DEFAULT_SCALE and app.SAMPLERS is defaults.SAMPLERS
    assert app.SHIPPED_MODEL is defaults.SHIPPED_MODEL and app.build_parser().get_default("pretrained") == str(
        defaults.SHIPPED_MODEL)


def test_a_photo_sized_edit_keeps_the_photo_outside_the_mask_bit_for_bit(editor):
    """The default settings on a photo larger than the model's working size (the shipped model works at 64²):
    a crop around the mask is edited and pasted back, so the edit has the photo's size and, outside the mask,
    its pixels exactly."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:120, :200]
    photo = np.stack([xx * 255 // 199, yy * 255 // 119, rng.integers(0, 256, (120, 200))], -1).astype(np.uint8)
    mask = np.zeros((120, 200), np.uint8)
    mask[44:76, 130:162] = 255
    edits, grid = editor.edit(photo, mask, example("reference"), steps=3)
    assert len(edits) == 1 and edits[0].shape == photo.shape and edits[0].dtype == np.uint8
    outside = mask == 0
    np.testing.assert_array_equal(edits[0][outside], photo[outside])
    assert (edits[0][~outside] != photo[~outside]).any(-1).mean() > 0.5  # and the masked region was edited
    assert grid.shape[0] == 360  # 120 rows enlarged by whole pixels to at least 256


def test_examples_from_the_shipped_folder_and_a_batch_folder(tmp_path):
    for part in ("source", "mask", "reference"):
        (tmp_path / "set" / part).mkdir(parents=True)
        shutil.copy(EXAMPLE / f"{part}.png", tmp_path / "set" / part / "a.png")
    found = app.find_examples([EXAMPLE, tmp_path / "set"])
    assert found == [(EXAMPLE / "source.png", EXAMPLE / "mask.png", EXAMPLE / "reference.png"),
                     tuple(tmp_path / "set" / p / "a.png" for p in ("source", "mask", "reference"))]
    rows = app.example_rows(found[:1], tmp_path)
    assert rows[0][0]["background"] == str(EXAMPLE / "source.png") and rows[0][1] == str(EXAMPLE / "reference.png")
    with pytest.raises(SystemExit, match="--examples .*nowhere"):
        app.find_examples([tmp_path / "nowhere"])


# ---- the page, served -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """python -m pbe_jax.app on a free localhost port, the shipped model."""
    from conftest import free_port

    port = free_port()
    log = tmp_path_factory.mktemp("app") / "app.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pbe_jax.app", "--port", str(port)], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the app exited: {log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"the app never answered: {log.read_text()[-3000:]}")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium")
        pytest.skip("no chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(url, wait_until="networkidle")
    page.locator("#source input[type=file]").set_input_files(str(EXAMPLE / "source.png"))
    page.locator("#reference input[type=file]").set_input_files(str(EXAMPLE / "reference.png"))
    page.get_by_text("%", exact=False).first.wait_for()  # the editor's zoom: the image is on the canvas
    page.wait_for_timeout(500)
    return page


def paint(page, start, end, width=64):
    """A brush stroke from image pixel `start` to `end` ((x, y) of the width × width source): the editor centres
    the image in its canvas at the zoom it shows."""
    zoom = float(page.locator("#source").inner_text().split("%")[0].split()[-1]) / 100
    box = page.locator("#source canvas").first.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    at = lambda u, v: (cx + (u - width / 2) * zoom, cy + (v - width / 2) * zoom)  # noqa: E731
    page.mouse.move(*at(*start))
    page.mouse.down()
    for t in np.linspace(0, 1, 12)[1:]:
        page.mouse.move(*at(start[0] + t * (end[0] - start[0]), start[1] + t * (end[1] - start[1])))
        page.wait_for_timeout(15)  # a loaded machine's canvas takes its time with each move
    page.mouse.up()
    page.wait_for_timeout(300)


def test_paint_a_stroke_and_edit_in_a_browser(server, browser, tmp_path):
    page = open_page(browser, server)
    start, end = (20, 32), (44, 32)
    paint(page, start, end)
    page.locator("#settings").get_by_text("Settings").first.click()
    page.get_by_label("Keep the unmasked part of the source exactly").check()
    page.locator("#edit").click()
    result = page.locator("#edits img").first
    said = page.locator(".toast-body").first  # an error the page shows instead: fail with its sentence
    result.or_(said).wait_for(timeout=180_000)
    assert not said.is_visible(), said.inner_text()
    edit = np.asarray(Image.open(io.BytesIO(page.request.get(result.get_attribute("src")).body())).convert("RGB"))
    page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
    if os.environ.get("PBE_JAX_APP_SCREENSHOT"):  # the README's picture
        shutil.copy(tmp_path / "app.png", os.environ["PBE_JAX_APP_SCREENSHOT"])
    source = example("source")
    assert edit.shape == source.shape
    # distance of every pixel from the stroke's centre line
    yy, xx = np.mgrid[:64, :64]
    along = np.clip(xx - start[0], 0, end[0] - start[0])
    distance = np.hypot(xx - start[0] - along, yy - start[1])
    changed = np.abs(edit.astype(int) - source.astype(int)).max(-1) > 8
    inside, outside = distance <= 3, distance > app.BRUSH + 2
    assert changed[inside].mean() > 0.5, changed[inside].mean()  # the stroke was repainted
    np.testing.assert_array_equal(edit[outside], source[outside])  # keep-unmasked: the rest untouched
    page.close()


def test_bad_input_is_said_in_the_page(server, browser, tmp_path):
    """No mask painted; an exemplar file that is no image (gradio's own decoding would answer with its internal
    message); a source file that is no image (the editor would drop it without a word): the page's sentences."""
    page = open_page(browser, server)
    page.locator("#edit").click()
    # As long as an edit may take (test_paint_a_stroke_and_edit_in_a_browser): the page serves one request at
    # a time, and on a loaded 2-core machine another test's edit can still hold the queue (60 s failed once).
    page.get_by_text("No mask was painted").first.wait_for(timeout=180_000)
    (tmp_path / "notes.png").write_text("not an image")
    page.locator("#reference input[type=file]").set_input_files(str(tmp_path / "notes.png"))
    page.locator("#edit").click()
    page.get_by_text("The exemplar (reference image) file notes.png is not an image Pillow can read").first.wait_for(
        timeout=180_000)
    page.locator("#source input[type=file]").set_input_files(str(tmp_path / "notes.png"))
    page.get_by_text("The source image file notes.png is not an image Pillow can read").first.wait_for(
        timeout=60_000)
    assert "Traceback" not in page.content() and "Could not preprocess" not in page.content()
    page.close()


def test_the_edit_endpoint_through_gradio_client(server, tmp_path):
    """gradio_client.Client(url).predict(source, mask, reference, steps, scale, seed, sampler, keep_unmasked,
    api_name="/edit"): the image `PaintByExample` itself gives for those inputs, bit for bit. The settings
    appended since (padding_mask_crop, mask_blur, strength) are optional: given as their defaults, the same
    image; given wrong, their sentences."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    from pbe_jax import parallel
    from pbe_jax.pipeline import PaintByExample

    client = Client(server, verbose=False)
    files = [handle_file(str(EXAMPLE / f"{name}.png")) for name in ("source", "mask", "reference")]
    got = np.asarray(Image.open(client.predict(*files, 12, 4.0, 7, "ddim", False, api_name="/edit")).convert("RGB"))
    pipe = PaintByExample.from_pretrained(app.SHIPPED_MODEL, mesh=parallel.data_mesh())
    want = pipe(example("source"), example("mask"), example("reference"), steps=12, guidance_scale=4.0, seed=7,
                sampler="ddim")[0]
    np.testing.assert_array_equal(got, want)
    again = client.predict(*files, 12, 4.0, 7, "ddim", False, "auto", 0, 1.0, api_name="/edit")
    np.testing.assert_array_equal(np.asarray(Image.open(again).convert("RGB")), want)

    for settings, message in [(("wide", 0, 1.0), "crop margin must be"), (("auto", -1, 1.0), "mask blur must be"),
                              (("auto", 0, 1.5), r"strength must be in \(0, 1\], not 1.5")]:
        with pytest.raises(AppError, match=message):
            client.predict(*files, 12, 4.0, 7, "ddim", False, *settings, api_name="/edit")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(AppError, match="The source image file notes.png is not an image Pillow can read"):
        client.predict(handle_file(str(tmp_path / "notes.png")), *files[1:], 12, 4.0, 7, "ddim", False,
                       api_name="/edit")
