"""The web UI in a real browser: Debian's headless Chromium driven by Playwright, against `imagine serve`.

CI installs chromium when it is missing and sets IMAGINE_REQUIRE_BROWSER=1, so there this test can fail but
never skip; elsewhere it skips with the reason when no browser is installed."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _need_browser():
    missing = []
    if CHROMIUM is None:
        missing.append("chromium (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright (pip install -e '.[test]')")
    if missing:
        if os.environ.get("IMAGINE_REQUIRE_BROWSER"):
            pytest.fail(f"the browser test needs {', '.join(missing)}")
        pytest.skip(f"no {', '.join(missing)}")


@contextlib.contextmanager
def _page(server: str):
    """A Chromium page on the UI, and the page errors it reports (a test ends by asserting there are none)."""
    _need_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server + "/")
            yield page, errors
        finally:
            browser.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_t2i_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ui-outputs")
    models = tmp_path_factory.mktemp("ui-models")  # an A1111 models folder with a separate VAE
    shutil.copytree(tiny_t2i_dir / "vae", models / "VAE" / "tiny-vae")
    from imagine.adapters.lora import create
    from imagine.io.lora_keys import save_lora
    from imagine.io.networks import load_unet

    (models / "Lora").mkdir()
    save_lora(create({"unet": load_unet(tiny_t2i_dir / "unet")}, rank=2), models / "Lora" / "tiny-style.safetensors")
    import torch

    from imagine.adapters.embeddings import Embedding
    from imagine.io.embeddings import save_embedding

    save_embedding(Embedding("e", {"emb_params": torch.randn(1, 384)}), models / "embeddings" / "my-thing.safetensors")
    from imagine.io.networks import save_diffusers_model
    from imagine.models import ControlNetModel

    unet = load_unet(tiny_t2i_dir / "unet")
    save_diffusers_model(ControlNetModel.from_unet(unet, latent_factor=2), models / "ControlNet" / "cn-scribble",
                         "ControlNetModel", {"condition": "scribble"})
    from imagine.io.ip_adapter_files import save_ip_adapter
    from imagine.models.ip_adapter import IPAdapter

    (models / "ipadapter").mkdir()
    save_ip_adapter(IPAdapter.from_unet(unet, 275), models / "ipadapter" / "ip-colours.safetensors", "palette")
    with _serving(["--model", str(tiny_t2i_dir), "--out", str(out), "--max-steps", "1000", "--models-dir",
                   str(models)]) as url:
        yield url


@contextlib.contextmanager
def _serving(args: list[str]):
    """`imagine serve ARGS` on a free port, as a user starts it; its URL once it answers."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "imagine", "serve", "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"imagine serve exited: {proc.stdout.read()[-3000:]}")
        try:
            if httpx.get(url + "/api/v1/status", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise AssertionError("imagine serve did not come up in 120 s")
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_binds_loopback_by_default(server):
    """The listening socket's local address, from the kernel's table: 127.0.0.1, not 0.0.0.0."""
    port = int(server.rsplit(":", 1)[1])
    table = Path("/proc/net/tcp")
    if not table.exists():
        pytest.skip("no /proc/net/tcp on this system")
    listening = [line.split()[1] for line in table.read_text().splitlines()[1:]
                 if line.split()[3] == "0A" and int(line.split()[1].split(":")[1], 16) == port]
    assert listening == [f"0100007F:{port:04X}"], listening  # 127.0.0.1, little-endian hex


def test_generate_progress_image_and_png_info_in_chromium(server):
    _need_browser()
    from playwright.sync_api import expect

    with _page(server) as (page, errors):
        expect(page.locator("#model-badge")).to_contain_text("tiny-shapes")
        expect(page.locator("#sampler option")).not_to_have_count(0)
        # a field the model does not read is disabled, not ignored: imagine's UNet embeds no distilled guidance
        expect(page.locator("#distilled_cfg_scale")).to_be_disabled()
        expect(page.locator("#clip_skip")).to_be_enabled()
        page.fill("#prompt", "a red circle above a blue square")
        page.fill("#steps", "100")
        page.fill("#seed", "42")
        page.click("#generate-button")
        # progress while it runs: the bar moves and the text counts steps
        expect(page.locator("#status-text")).to_contain_text("of 100", timeout=60_000)
        expect(page.locator("#preview")).to_be_visible(timeout=60_000)
        assert page.eval_on_selector("#progress", "p => p.value") > 0
        # the image, its download link and its parameters
        figure = page.locator("figure.result").first
        expect(figure).to_be_visible(timeout=120_000)
        expect(page.locator("#status-text")).to_have_text("done")
        assert page.eval_on_selector("figure.result img", "img => img.complete && img.naturalWidth") == 16
        expect(figure.locator("figcaption")).to_contain_text("Seed: 42")
        expect(figure.locator("a")).to_have_attribute("download", "42-txt2img.png")
        # PNG info on it, then back to txt2img with its parameters
        page.fill("#prompt", "something else")
        page.fill("#seed", "1")
        figure.locator("button.png-info").click()
        expect(page.locator("#pnginfo")).to_be_visible()
        expect(page.locator("#png-parameters")).to_contain_text("a red circle above a blue square")
        expect(page.locator("#png-parameters")).to_contain_text("Steps: 100")
        page.click("#send-to-txt2img")
        expect(page.locator("#prompt")).to_be_visible()
        expect(page.locator("#prompt")).to_have_value("a red circle above a blue square")
        expect(page.locator("#seed")).to_have_value("42")
        assert page.locator("#warnings").is_hidden()  # every word of that prompt was in its captions
        # words the model never saw: the page says so above the result
        page.fill("#prompt", "draw a cat")
        page.fill("#steps", "2")
        page.click("#generate-button")
        expect(page.locator("#warnings")).to_contain_text("never saw in a training caption: draw, cat")
        expect(page.locator("figure.result")).to_have_count(2, timeout=60_000)
        # a bad request shows the server's message instead of failing silently
        page.fill("#steps", "5000")
        page.click("#generate-button")
        expect(page.locator("#error")).to_contain_text("max_steps")
        assert errors == [], errors


def test_inpaint_with_a1111_options_from_the_ui(server, tmp_path):
    """Upload an image, draw a mask, pick masked content and inpaint-only-masked: the result carries them."""
    _need_browser()
    import numpy as np
    from PIL import Image
    from playwright.sync_api import expect

    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(init)
    with _page(server) as (page, errors):
        page.click("button[data-tab=inpaint]")
        expect(page.locator("#inpaint_fill")).to_be_visible()
        page.set_input_files("#init-file", str(init))
        page.wait_for_timeout(300)
        box = page.locator("#mask-canvas").bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.4, box["y"] + box["height"] * 0.4)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.6, steps=5)
        page.mouse.up()
        page.fill("#prompt", "a red circle")
        page.fill("#steps", "3")
        page.fill("#seed", "7")
        page.fill("#width", "16")
        page.fill("#height", "16")
        page.select_option("#inpaint_fill", "fill")
        page.check("#inpaint_only_masked")
        page.fill("#clip_skip", "2")
        page.select_option("#sampler", label="Euler a")
        page.fill("#noise_seed_delta", "31337")
        page.click("#generate-button")
        figure = page.locator("figure.result").first
        expect(figure).to_be_visible(timeout=120_000)
        caption = figure.locator("figcaption")
        for text in ("Masked content: fill", "Inpaint area: Only masked", "Clip skip: 2", "ENSD: 31337", "Seed: 7"):
            expect(caption).to_contain_text(text)
        # only masked: the result has the init image's size, not the 16x16 it was worked at
        assert page.eval_on_selector("figure.result img", "img => img.complete && img.naturalWidth") == 32
        assert errors == [], errors


def test_outpaint_borders_preview_and_grow_the_image_from_the_ui(server, tmp_path):
    """The outpaint fieldset: borders drawn on the preview canvas to scale, the image grown by them, no mask."""
    _need_browser()
    import numpy as np
    from PIL import Image
    from playwright.sync_api import expect

    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(init)
    with _page(server) as (page, errors):
        page.click("button[data-tab=inpaint]")
        expect(page.locator("#outpaint_right")).to_be_visible()
        page.set_input_files("#init-file", str(init))
        page.wait_for_timeout(300)
        page.fill("#outpaint_right", "16")
        page.fill("#outpaint_down", "8")
        expect(page.locator("#outpaint-size")).to_have_text("32x24 px")
        # the preview: the image at the top left, the striped border to its right (grey, not the image)
        pixel = "([x, y]) => Array.from($('outpaint-preview').getContext('2d').getImageData(x, y, 1, 1).data)"
        assert page.evaluate(pixel, [200, 20])[3] == 255 and page.evaluate(pixel, [250, 250])[3] == 0
        page.fill("#prompt", "a red circle")
        page.fill("#steps", "3")
        page.select_option("#inpaint_fill", "fill")
        page.click("#generate-button")
        figure = page.locator("figure.result").first
        expect(figure).to_be_visible(timeout=120_000)
        expect(figure.locator("figcaption")).to_contain_text("Outpaint: right 16 down 8")
        assert page.eval_on_selector("figure.result img", "img => img.complete && img.naturalWidth") == 32
        assert errors == [], errors


def test_edit_tab_inverts_and_edits_an_image(server, tmp_path):
    """The edit tab: an init image, the source prompt and the target prompt; the result records the edit."""
    _need_browser()
    import numpy as np
    from PIL import Image
    from playwright.sync_api import expect

    px = np.zeros((16, 16, 3), np.uint8)
    px[4:12, 4:12] = (220, 30, 30)
    init = tmp_path / "init.png"
    Image.fromarray(px).save(init)
    with _page(server) as (page, errors):
        page.click("button[data-tab=edit]")
        expect(page.locator("#source_prompt")).to_be_visible()
        expect(page.locator("#mask-canvas")).to_be_hidden()
        page.set_input_files("#init-file", str(init))
        page.wait_for_timeout(300)
        page.fill("#prompt", "a blue square")
        page.fill("#source_prompt", "a red square")
        page.fill("#steps", "3")
        page.fill("#n", "2")  # an edit is one image: the tab sends n = 1
        page.click("#generate-button")
        figure = page.locator("figure.result").first
        expect(figure).to_be_visible(timeout=120_000)
        for text in ("Source prompt: a red square", "Inversion: DDIM", "Edit mask: DiffEdit"):
            expect(figure.locator("figcaption")).to_contain_text(text)
        assert page.locator("figure.result").count() == 1
        assert errors == [], errors


def test_vae_picker_reaches_the_image(server):
    """The models tab lists the models folder's VAEs; the one picked makes the next image and is recorded."""
    _need_browser()
    from playwright.sync_api import expect

    with _page(server) as (page, errors):
        page.click("button[data-tab=models]")
        expect(page.locator("#vae option")).to_have_count(2)  # Automatic and tiny-vae
        page.select_option("#vae", "tiny-vae")
        page.click("button[data-tab=txt2img]")
        page.fill("#prompt", "a blue star")
        page.fill("#steps", "4")
        page.click("#generate-button")
        figure = page.locator("figure.result").first
        expect(figure).to_be_visible(timeout=120_000)
        expect(figure.locator("figcaption")).to_contain_text("VAE: tiny-vae", timeout=120_000)
        assert errors == [], errors


def _pick_generate_and_read(page, picker: str, option: str, prompt: str):
    """Choose ``option`` in a prompt picker after writing ``prompt``, generate, and return the caption."""
    from playwright.sync_api import expect

    expect(page.locator(f"{picker} option")).to_have_count(2)  # the placeholder and the one file
    page.fill("#prompt", prompt)
    page.select_option(picker, option)
    written = page.locator("#prompt").input_value()
    page.fill("#steps", "3")
    page.click("#generate-button")
    figure = page.locator("figure.result").first
    expect(figure).to_be_visible(timeout=120_000)
    return written, figure.locator("figcaption")


def test_lora_picker_inserts_the_tag_and_the_image_records_it(server):
    _need_browser()
    from playwright.sync_api import expect

    with _page(server) as (page, errors):
        written, caption = _pick_generate_and_read(page, "#lora-picker", "tiny-style", "a red circle")
        assert written == "a red circle <lora:tiny-style:1>"
        expect(caption).to_contain_text('Lora hashes: "tiny-style: ', timeout=120_000)
        assert errors == [], errors


def test_embedding_picker_writes_the_name_and_the_image_records_it(server):
    _need_browser()
    from playwright.sync_api import expect

    with _page(server) as (page, errors):
        written, caption = _pick_generate_and_read(page, "#embedding-picker", "my-thing", "a red")
        assert written == "a red my-thing"
        expect(caption).to_contain_text('TI hashes: "my-thing: ', timeout=120_000)
        assert errors == [], errors


def test_merger_tab_merges_and_serves_the_result(server):
    _need_browser()
    from playwright.sync_api import expect

    with _page(server) as (page, errors):
        page.click("#tabs button[data-tab=merger]")
        expect(page.locator("#merge-a option")).not_to_have_count(0)
        page.select_option("#merge-mode", "add-difference")  # needs C: the server says so
        page.fill("#merge-name", "ui-merge")
        page.click("#merge-run")
        expect(page.locator("#merge-result")).to_contain_text("three models", timeout=60_000)
        page.select_option("#merge-mode", "weighted-sum")
        page.fill("#merge-m", "0.25")
        page.click("#merge-run")
        expect(page.locator("#merge-result")).to_contain_text("wrote ui-merge", timeout=120_000)
        expect(page.locator("#merge-a option", has_text="ui-merge")).to_have_count(1)
        page.click("#tabs button[data-tab=models]")
        expect(page.locator("#model-list")).to_contain_text("ui-merge")
        assert errors == [], errors


def test_controlnet_unit_drawn_previewed_and_run_from_the_ui(server):
    _need_browser()
    from playwright.sync_api import expect

    with _page(server) as (page, errors):
        page.click("#controlnet summary")
        page.click("#add-control")
        unit = page.locator(".control-unit").first
        expect(unit).to_be_visible()
        expect(unit.locator(".control-model option")).to_have_count(2)  # automatic, and the one in the folder
        canvas = unit.locator(".control-canvas")
        box = canvas.bounding_box()
        page.mouse.move(box["x"] + 20, box["y"] + 20)
        page.mouse.down()
        page.mouse.move(box["x"] + 100, box["y"] + 90, steps=12)
        page.mouse.up()
        unit.locator(".control-module").select_option("scribble")
        unit.locator(".control-detect").click()
        expect(unit.locator(".control-preview")).to_be_visible(timeout=30_000)
        unit.locator(".control-weight").fill("0.7")
        unit.locator(".control-end").fill("0.8")
        page.fill("#prompt", "a red circle")
        page.fill("#steps", "3")
        page.click("#generate-button")
        figure = page.locator("figure.result").first
        expect(figure).to_be_visible(timeout=120_000)
        caption = figure.locator("figcaption")
        expect(caption).to_contain_text('ControlNet 0: "Module: scribble, Model: cn-scribble [', timeout=120_000)
        expect(caption).to_contain_text("Weight: 0.7")
        expect(caption).to_contain_text("Guidance End: 0.8")
        assert page.locator("#control-count").inner_text() == "1"
        assert errors == [], errors


def test_image_prompt_slot_and_variations_from_the_ui(server, tmp_path):
    _need_browser()
    from PIL import Image
    from playwright.sync_api import expect

    Image.new("RGB", (32, 32), (40, 180, 60)).save(tmp_path / "green.png")
    with _page(server) as (page, errors):
        page.click("#image-prompts summary")
        page.click("#add-image-prompt")
        unit = page.locator(".image-prompt-unit").first
        expect(unit).to_be_visible()
        options = unit.locator(".image-prompt-model option")  # automatic, the folder's one, the shipped ones
        expect(options.nth(1)).to_contain_text("ip-colours [")
        assert "shapes-palette" in " ".join(options.all_inner_texts())
        unit.locator(".image-prompt-file").set_input_files(str(tmp_path / "green.png"))
        expect(unit.locator(".image-prompt-preview")).to_be_visible()
        unit.locator(".image-prompt-type").select_option("palette")
        unit.locator(".image-prompt-scale").evaluate(
            "el => { el.value = '0.55'; el.dispatchEvent(new Event('input')); }")
        expect(unit.locator(".image-prompt-scale-value")).to_have_text("0.55")
        page.fill("#prompt", "")
        page.fill("#steps", "3")
        page.click("#generate-button")
        figure = page.locator("figure.result").first
        expect(figure).to_be_visible(timeout=120_000)
        caption = figure.locator("figcaption")
        expect(caption).to_contain_text('"Module: ip-adapter_palette, Model: ip-colours [', timeout=120_000)
        expect(caption).to_contain_text("Weight: 0.55")
        before = page.locator("figure.result").count()
        page.fill("#n", "2")
        page.click("#variations-button")
        expect(page.locator("figure.result")).to_have_count(before + 2, timeout=120_000)
        assert page.locator("#image-prompt-count").inner_text() == "1"
        assert errors == [], errors


def test_hires_fix_and_the_extras_tab(server, tmp_path):
    """Hires fix from the txt2img form doubles the image and records it; the Extras tab upscales uploaded
    pictures with a resampler and a second one blended in, and says what is wrong with a bad request."""
    _need_browser()
    import numpy as np
    from PIL import Image
    from playwright.sync_api import expect

    pictures = []
    for i in range(2):
        pictures.append(tmp_path / f"p{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(pictures[-1])
    with _page(server) as (page, errors):
        expect(page.locator("#hires")).to_be_visible()
        page.fill("#prompt", "a blue star")
        page.fill("#steps", "2")
        page.fill("#seed", "3")
        page.click("#hires summary")
        page.check("#hires-enable")
        expect(page.locator("#hires_upscaler option[value=Latent]")).to_have_count(1)
        page.select_option("#hires_upscaler", "Bicubic")
        page.fill("#hires_strength", "0.5")
        page.click("#generate-button")
        expect(page.locator("#status-text")).to_have_text("done", timeout=120_000)
        assert page.inner_text("#error") == ""
        figure = page.locator("figure.result").first
        expect(figure).to_be_visible()
        for text in ("Hires upscale: 2", "Hires upscaler: Bicubic", "Denoising strength: 0.5"):
            expect(figure.locator("figcaption")).to_contain_text(text)
        assert page.eval_on_selector("figure.result img", "img => img.complete && img.naturalWidth") == 32
        page.click("button[data-tab=img2img]")
        expect(page.locator("#hires")).to_be_hidden()

        page.click("button[data-tab=extras]")
        expect(page.locator("#extras-form")).to_be_visible()
        expect(page.locator("#extras-upscaler option[value=Lanczos]")).to_have_count(1)
        page.set_input_files("#extras-files", [str(p) for p in pictures])
        page.fill("#extras-scale", "2")
        page.select_option("#extras-upscaler", "Lanczos")
        page.select_option("#extras-upscaler-2", "Nearest")
        page.click("#extras-run")
        expect(page.locator("#extras-status")).to_have_text("done", timeout=60_000)
        results = page.locator("#extras-gallery figure.result")
        expect(results).to_have_count(2)
        expect(results.first.locator("figcaption")).to_contain_text("Postprocess upscaler 2: Nearest")
        assert page.eval_on_selector("#extras-gallery img", "img => img.complete && img.naturalWidth") == 20
        page.fill("#extras-scale", "40")
        page.click("#extras-run")
        expect(page.locator("#extras-status")).to_contain_text("less than or equal to 16")
        assert errors == [], errors


def test_text_encoder_picker_serves_an_sd3_file_with_separate_parts(tmp_path):
    """An SD3 transformer file whose CLIP-L and CLIP-G are separate files in models/text_encoders/ (as Stability
    ships SD 3.5): the models tab lists them, the picked ones make the image, and its parameters name them as
    Forge does ("Module 1: ...")."""
    _need_browser()
    import json

    from playwright.sync_api import expect
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from imagine.io import sd3_files
    from imagine.io.stable_diffusion import save_single_file
    from imagine.pipelines.request import load_text_model
    from tests.tiny_sd import write_sd3

    write_sd3(tmp_path / "pipe", t5=False, inferable=True)
    model, _ = load_text_model(tmp_path / "pipe")
    whole = save_single_file(model, tmp_path / "whole.safetensors")
    tensors = load_file(str(whole))
    with safe_open(str(whole), "pt") as handle:
        ours = json.loads(handle.metadata()["imagine"])
    models = tmp_path / "models"
    (models / "text_encoders").mkdir(parents=True)
    bare = tmp_path / "sd35-bare.safetensors"
    save_file({k: v for k, v in tensors.items() if not k.startswith("text_encoders.")}, str(bare),
              {"imagine": json.dumps({k: ours[k] for k in ("transformer", "vae")})})
    for name, prefix in (("clip_l", sd3_files.CLIP_L), ("clip_g", sd3_files.CLIP_G)):
        save_file({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                  str(models / "text_encoders" / f"{name}.safetensors"))
    with _serving(["--model", str(bare), "--models-dir", str(models), "--out", str(tmp_path / "out")]) as url, \
            _page(url) as (page, errors):
        page.click("button[data-tab=models]")
        expect(page.locator("#text_encoders option")).to_have_count(2)
        expect(page.locator("#text_encoders")).to_be_enabled()
        page.select_option("#text_encoders", ["clip_g", "clip_l"])
        page.click("button[data-tab=txt2img]")
        page.fill("#prompt", "a red circle")
        page.fill("#steps", "2")
        page.fill("#width", "16")
        page.fill("#height", "16")
        page.click("#generate-button")
        figure = page.locator("figure.result").first
        expect(figure).to_be_visible(timeout=120_000)
        expect(figure.locator("figcaption")).to_contain_text("Module 1: clip_g", timeout=120_000)
        expect(figure.locator("figcaption")).to_contain_text("Module 2: clip_l")
        assert errors == [], errors


def test_refiner_picker_refines_with_a_second_model(tmp_path):
    """A served SDXL base and refiner: the Refiner box lists the served models, and the picked refiner takes the
    last steps; the image says so as A1111 writes it."""
    _need_browser()
    pytest.importorskip("diffusers")
    from playwright.sync_api import expect

    from tests.tiny_sd import write_pipeline, write_refiner

    base = write_pipeline("sdxl", tmp_path / "sdxl-base")
    write_refiner(tmp_path / "sdxl-refiner", vae=base.vae)
    with _serving(["--model", str(tmp_path / "sdxl-base"), "--model", str(tmp_path / "sdxl-refiner"), "--out",
                   str(tmp_path / "out")]) as url, _page(url) as (page, errors):
        expect(page.locator("#refiner option[value=sdxl-refiner]")).to_have_count(1)
        page.click("#refiner-box summary")
        page.select_option("#refiner", "sdxl-refiner")
        page.fill("#refiner_switch_at", "0.6")
        page.fill("#prompt", "a red circle")
        page.fill("#steps", "3")
        page.fill("#width", "16")
        page.fill("#height", "16")
        page.click("#generate-button")
        figure = page.locator("figure.result").first
        expect(figure).to_be_visible(timeout=120_000)
        expect(figure.locator("figcaption")).to_contain_text("Refiner: sdxl-refiner")
        expect(figure.locator("figcaption")).to_contain_text("Refiner switch at: 0.6")
        assert errors == [], errors
