"""The HTTP API against the real app (FastAPI's TestClient): job lifecycle, A1111 endpoints, bad input."""

from __future__ import annotations

import base64
import io
import json
import shutil
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from imagine.io.model_folder import load_model_folder
from imagine.io.png import read_png_metadata
from imagine.models.text_encoders import default_text_encoder
from imagine.pipelines.generate import Settings, txt2img
from imagine.pipelines.unconditional import to_uint8
from imagine.server import Limits, create_app


def _b64(img: Image.Image) -> str:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _wait(client, job_id, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


def _wait_running(client, job_id, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/api/v1/jobs/{job_id}?base64=false").json()
        if job["status"] == "running" and job["step"] >= 1:
            return job
        time.sleep(0.01)
    raise AssertionError(f"job {job_id} never started")


@pytest.fixture(scope="module")
def models(tiny_t2i_dir, tmp_path_factory):
    second = tmp_path_factory.mktemp("second") / "other-model"
    shutil.copytree(tiny_t2i_dir, second)
    spec = json.loads((second / "diffusion.json").read_text())  # defaults of its own, for the defaults test
    (second / "diffusion.json").write_text(json.dumps({**spec, "default_steps": 3, "default_cfg": 2.0}))
    return [tiny_t2i_dir, second]


@pytest.fixture(scope="module")
def client(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs")
    app = create_app(models, out_dir=out, limits=Limits(max_steps=1000, max_batch=4, max_pixels=64 * 64,
                                                        max_request_bytes=200_000), max_queue=2)
    with TestClient(app) as c:
        c.out_dir = out
        yield c


def test_job_lifecycle_events_images_and_parameters(client, tiny_t2i_dir):
    r = client.post("/api/v1/jobs", json={"prompt": "a red circle", "steps": 6, "seed": 11, "n": 2})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    events = []
    with client.stream("GET", f"/api/v1/jobs/{job_id}/events") as stream:
        kind = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
    assert events[-1][0] == "done"
    steps = [d["step"] for k, d in events if k == "progress" and d["status"] == "running"]
    assert steps and steps == sorted(steps) and max(steps) <= 6
    assert any("preview" in d for k, d in events if k == "progress"), "no live preview was streamed"
    job = client.get(f"/api/v1/jobs/{job_id}").json()
    assert job["status"] == "done" and job["progress"] == 1.0 and len(job["images"]) == 2
    # each image: base64 and URL agree, carries its parameters, and equals the pipeline's output for its seed
    model, encoder = load_model_folder(tiny_t2i_dir), default_text_encoder()
    expected = to_uint8(txt2img(model, Settings(prompt="a red circle", steps=6, seed=11, n=2), encoder))
    for i, image in enumerate(job["images"]):
        data = base64.b64decode(image["base64"])
        assert client.get(image["url"]).content == data
        assert image["seed"] == 11 + i and f"Seed: {11 + i}" in image["parameters"]
        parameters, record = read_png_metadata(data)
        assert parameters == image["parameters"] and record["settings"]["seed"] == 11 + i
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), expected[i])
    assert len(list(client.out_dir.glob("*.png"))) >= 2


def test_words_the_model_never_saw_are_named_in_warnings_on_both_apis(client, tiny_t2i_dir):
    """A model trained here records its captions' words; a prompt outside them is served with a warning
    naming them (the job API when the job is made and while it is read; A1111's warnings), and a prompt
    in the vocabulary gets none."""
    assert (tiny_t2i_dir / "vocabulary.json").is_file()
    created = client.post("/api/v1/jobs", json={"prompt": "draw a (red:1.2) cat", "negative_prompt": "a blurry dog",
                                                "steps": 2})
    assert created.status_code == 202, created.text
    warnings = created.json()["warnings"]
    assert len(warnings) == 2 and "draw, cat" in warnings[0] and "prompt" in warnings[0]
    assert "negative prompt" in warnings[1] and "blurry, dog" in warnings[1] and "red" not in " ".join(warnings)
    assert _wait(client, created.json()["id"])["warnings"] == warnings
    assert client.post("/api/v1/jobs", json={"prompt": "two red circles", "steps": 2}).json()["warnings"] == []
    data = client.post("/sdapi/v1/txt2img", json={"prompt": "a green giraffe", "steps": 2}).json()
    assert len(data["warnings"]) == 1 and "giraffe" in data["warnings"][0] and "green" not in data["warnings"][0]


def test_a_request_without_steps_or_cfg_gets_the_models_defaults(client):
    listed = {m["name"]: m["defaults"] for m in client.get("/api/v1/models").json()["models"]}
    assert listed["other-model"] == {"steps": 3, "sampler": "dpmpp_2m", "cfg_scale": 2.0}
    r = client.post("/api/v1/jobs", json={"prompt": "a red circle", "seed": 1, "model": "other-model"})
    assert r.status_code == 202, r.text
    job = _wait(client, r.json()["id"])
    settings = read_png_metadata(base64.b64decode(job["images"][0]["base64"]))[1]["settings"]
    assert (settings["steps"], settings["cfg_scale"]) == (3, 2.0)
    r = client.post("/api/v1/jobs", json={"prompt": "a red circle", "seed": 1, "model": "other-model", "steps": 2,
                                          "cfg_scale": 4})
    settings = read_png_metadata(base64.b64decode(_wait(client, r.json()["id"])["images"][0]["base64"]))[1]["settings"]
    assert (settings["steps"], settings["cfg_scale"]) == (2, 4.0)  # what a request names wins


def test_cancel_running_and_queued_jobs_and_full_queue(client):
    slow = {"prompt": "a blue star", "steps": 1000, "n": 4, "previews": False}
    running = client.post("/api/v1/jobs", json=slow).json()["id"]
    _wait_running(client, running)
    queued = [client.post("/api/v1/jobs", json=slow).json()["id"] for _ in range(2)]  # max_queue=2
    refused = client.post("/api/v1/jobs", json=slow)
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    assert "max-queue" in refused.json()["detail"]
    r = client.delete(f"/api/v1/jobs/{queued[0]}")
    assert r.json()["status"] == "cancelled"  # a queued job is cancelled at once
    assert client.post("/api/v1/jobs", json={"prompt": "x", "steps": 2}).status_code == 202  # room again
    client.delete(f"/api/v1/jobs/{queued[1]}")
    client.delete(f"/api/v1/jobs/{running}")
    job = _wait(client, running)
    assert job["status"] == "cancelled" and job["step"] < 1000 and job["images"] == []


def test_a_failing_job_harms_no_other(client):
    service = client.app.state.service
    real = service.queue.runner

    def flaky(job):
        if job.request["prompt"] == "boom":
            raise RuntimeError("simulated failure")
        real(job)

    service.queue.runner = flaky
    try:
        bad = client.post("/api/v1/jobs", json={"prompt": "boom", "steps": 2}).json()["id"]
        good = client.post("/api/v1/jobs", json={"prompt": "a red circle", "steps": 2}).json()["id"]
        assert _wait(client, bad)["status"] == "failed"
        assert "simulated failure" in client.get(f"/api/v1/jobs/{bad}").json()["error"]
        assert _wait(client, good)["status"] == "done"
    finally:
        service.queue.runner = real


def test_a1111_txt2img_shapes(client):
    body = {"prompt": "a green square", "negative_prompt": "red", "seed": 5, "steps": 4, "batch_size": 2,
            "n_iter": 1, "cfg_scale": 4, "sampler_name": "DPM++ 2M", "scheduler": "Karras",
            "restore_faces": False, "enable_hr": False}  # fields A1111 clients send that we ignore
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert set(data) == {"images", "parameters", "info", "warnings"} and len(data["images"]) == 2
    assert data["warnings"] == []
    info = json.loads(data["info"])
    assert info["seed"] == 5 and info["all_seeds"] == [5, 6] and info["sampler_name"] == "DPM++ 2M"
    assert info["width"] == info["height"] == 16 and info["all_prompts"] == ["a green square"] * 2
    assert info["extra_generation_params"]["Schedule type"] == "Karras" and len(info["infotexts"]) == 2
    assert data["parameters"]["prompt"] == "a green square" and data["parameters"]["seed"] == 5
    assert _png(data["images"][0]).size == (16, 16)
    # seed -1 draws one and reports it
    info = json.loads(client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2}).json()["info"])
    assert info["seed"] >= 0 and info["all_seeds"] == [info["seed"]]


def test_a1111_img2img_and_inpaint_with_mask(client):
    init = Image.new("RGB", (16, 16), (200, 30, 30))
    r = client.post("/sdapi/v1/img2img", json={"init_images": [_b64(init)], "prompt": "a circle", "steps": 4,
                                               "denoising_strength": 0.5, "seed": 1})
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["info"])["denoising_strength"] == 0.5
    assert r.json()["parameters"]["init_images"] is None  # not echoed back unless asked
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (8, 0, 16, 16))  # regenerate the right half
    r = client.post("/sdapi/v1/img2img", json={"init_images": [_b64(init)], "mask": _b64(mask), "mask_blur": 0,
                                               "prompt": "a blue star", "steps": 4, "denoising_strength": 1.0})
    assert r.status_code == 200, r.text
    out = np.asarray(_png(r.json()["images"][0]).convert("RGB"))
    assert np.array_equal(out[:, :8], np.asarray(init)[:, :8]), "the unmasked half changed"
    assert not np.array_equal(out[:, 8:], np.asarray(init)[:, 8:])


def test_a1111_png_info_progress_interrupt(client):
    image = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "seed": 9, "steps": 3}).json()["images"][0]
    info = client.post("/sdapi/v1/png-info", json={"image": image}).json()
    assert info["info"].startswith("a red circle\nSteps: 3") and info["parameters"]["Seed"] == "9"
    assert "imagine" in info["items"]
    plain = client.post("/sdapi/v1/png-info", json={"image": _b64(Image.new("RGB", (4, 4)))}).json()
    assert plain == {"info": "", "items": {}, "parameters": {}}
    idle = client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
    job_id = client.post("/api/v1/jobs", json={"prompt": "x", "steps": 1000, "n": 4}).json()["id"]
    _wait_running(client, job_id)
    busy = client.get("/sdapi/v1/progress").json()
    assert 0 < busy["progress"] < 1 and busy["state"]["sampling_steps"] == 1000 and busy["state"]["job_count"] == 1
    assert client.post("/sdapi/v1/interrupt").json() == {}
    assert _wait(client, job_id)["status"] == "cancelled"


def test_a1111_models_options_samplers_schedulers(client):
    models = client.get("/sdapi/v1/sd-models").json()
    assert [m["model_name"] for m in models] == ["tiny-shapes", "other-model"]
    assert all(m["title"] == f"{m['model_name']} [{m['hash']}]" and len(m["sha256"]) == 64 for m in models)
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == models[0]["title"]
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "other-model"}).status_code == 200
    try:
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == models[1]["title"]
        info = json.loads(client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2}).json()["info"])
        assert info["sd_model_name"] == "other-model"
    finally:
        client.post("/sdapi/v1/options", json={"sd_model_checkpoint": models[0]["title"]})
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "../../etc/passwd"})
    assert r.status_code == 400 and "unknown" in r.json()["detail"]
    samplers = {s["name"]: s for s in client.get("/sdapi/v1/samplers").json()}
    assert {"Euler a", "DPM++ 2M", "UniPC", "DDIM"} <= set(samplers)
    assert "DPM++ 2M Karras" in samplers["DPM++ 2M"]["aliases"]
    assert [s["label"] for s in client.get("/sdapi/v1/schedulers").json()] == ["Automatic", "Uniform", "Karras"]


@pytest.mark.parametrize("method, url, kwargs, status, words", [
    ("post", "/api/v1/jobs", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 422,
     "not valid JSON"),
    ("post", "/api/v1/jobs", {"json": {"steps": "many"}}, 422, "steps"),
    ("post", "/api/v1/jobs", {"json": {"prompt": 5}}, 422, "prompt"),
    ("post", "/api/v1/jobs", {"json": {"kind": "upscale"}}, 422, "kind"),
    ("post", "/api/v1/jobs", {"json": {"colour": "red"}}, 422, "colour"),
    ("post", "/api/v1/jobs", {"json": {"width": 100000, "height": 100000}}, 422, "max_pixels"),
    ("post", "/api/v1/jobs", {"json": {"steps": 5000}}, 422, "max_steps"),
    ("post", "/api/v1/jobs", {"json": {"n": 50}}, 422, "max_batch"),
    ("post", "/api/v1/jobs", {"json": {"width": 17}}, 422, "multiple of"),
    ("post", "/api/v1/jobs", {"json": {"sampler": "eulr"}}, 422, "choose one of"),
    ("post", "/api/v1/jobs", {"json": {"model": "../../secret"}}, 404, "unknown"),
    ("post", "/api/v1/jobs", {"json": {"kind": "img2img", "init_image": "bm90IGFuIGltYWdl"}}, 422,
     "not a readable image"),
    ("post", "/api/v1/jobs", {"json": {"kind": "img2img", "init_image": "%%%"}}, 422, "not valid base64"),
    ("post", "/api/v1/jobs", {"json": {"kind": "img2img"}}, 422, "init image"),
    ("post", "/api/v1/jobs", {"json": {"prompt": "x" * 300_000}}, 413, "max_request_bytes"),
    ("post", "/sdapi/v1/txt2img", {"json": {"sampler_name": "Euler z"}}, 422, "choose one of"),
    ("post", "/sdapi/v1/txt2img", {"json": {"scheduler": "exponential"}}, 422, "Karras"),
    ("post", "/sdapi/v1/txt2img", {"json": {"batch_size": 3, "n_iter": 3}}, 422, "max_batch"),
    ("post", "/sdapi/v1/img2img", {"json": {"init_images": []}}, 422, "init_images"),
    ("post", "/sdapi/v1/png-info", {"json": {"image": "aGVsbG8="}}, 422, "not a readable image"),
    ("get", "/api/v1/jobs/../../etc", {}, 404, ""),
    ("get", "/api/v1/jobs/nope", {}, 404, "no job"),
])
def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(client, method, url, kwargs, status, words):
    r = getattr(client, method)(url, **kwargs)
    assert r.status_code == status, r.text
    if words:
        assert words in r.json()["detail"]
    assert client.get("/api/v1/status").status_code == 200


def test_basic_auth_guards_every_route(models, tmp_path):
    app = create_app(models[:1], out_dir=tmp_path, api_auth="ann:secret")
    with TestClient(app) as c:
        for url in ("/", "/docs", "/openapi.json", "/sdapi/v1/sd-models", "/api/v1/status", "/static/app.js"):
            r = c.get(url)
            assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic"), url
            assert c.get(url, auth=("ann", "wrong")).status_code == 401
            assert c.get(url, auth=("ann", "secret")).status_code == 200, url
    with pytest.raises(ValueError, match="USER:PASS"):
        create_app(models[:1], api_auth="no-colon")


def test_openapi_docs_and_web_ui_are_served_offline(client):
    spec = client.get("/openapi.json").json()
    assert {"/api/v1/jobs", "/api/v1/jobs/{job_id}", "/api/v1/jobs/{job_id}/events", "/sdapi/v1/txt2img",
            "/sdapi/v1/img2img", "/sdapi/v1/png-info", "/sdapi/v1/options"} <= set(spec["paths"])
    assert client.get("/docs").status_code == 200
    page = client.get("/").text
    for asset in ("/static/app.js", "/static/style.css"):
        assert asset in page and client.get(asset).status_code == 200
    everything = page + client.get("/static/app.js").text + client.get("/static/style.css").text
    assert "http://" not in everything and "https://" not in everything, "the UI must load nothing from elsewhere"


def test_a1111_hires_fix_and_its_refusals(client):
    body = {"prompt": "a red circle", "seed": 2, "steps": 2, "cfg_scale": 3, "enable_hr": True, "hr_scale": 2,
            "hr_upscaler": "Lanczos", "denoising_strength": 0.5, "hr_second_pass_steps": 2,
            "hr_sampler_name": "Use same sampler", "hr_prompt": "a red circle"}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert _png(data["images"][0]).size == (32, 32)
    info = json.loads(data["info"])
    assert info["denoising_strength"] == 0.5 and "Hires upscale: 2" in info["infotext"]
    assert "Hires upscaler: Lanczos" in info["infotext"] and "Hires steps: 2" in info["infotext"]
    for bad, words in (({"hr_sampler_name": "Euler"}, "second pass"), ({"hr_prompt": "another"}, "second pass"),
                       ({"hr_scale": 5}, "max_pixels"), ({"hr_upscaler": "ESRGAN_4x"}, "unknown")):
        r = client.post("/sdapi/v1/txt2img", json={**body, **bad})
        assert r.status_code in (413, 422) and words in r.json()["detail"], r.text
    job = client.post("/api/v1/jobs", json={"kind": "txt2img", "prompt": "a red circle", "steps": 2, "seed": 1,
                                            "hires_scale": 2, "hires_strength": 0.0, "hires_upscaler": "Bicubic"})
    assert job.status_code == 202, job.text
    done = _wait(client, job.json()["id"])
    assert done["status"] == "done" and _png(done["images"][0]["base64"]).size == (32, 32)


def test_a1111_extras_and_our_upscale_endpoint(client):
    r = client.get("/sdapi/v1/upscalers")
    names = [u["name"] for u in r.json()]
    assert names[:2] == ["None", "Lanczos"] and "Bicubic" in names
    assert client.get("/api/v1/upscalers").json()["hires_only"] == ["Latent"]
    made = client.post("/sdapi/v1/txt2img", json={"prompt": "a blue star", "steps": 2, "seed": 9}).json()
    picture = made["images"][0]
    r = client.post("/sdapi/v1/extra-single-image", json={"image": picture, "upscaling_resize": 2,
                                                           "upscaler_1": "Lanczos"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert _png(out["image"]).size == (32, 32)
    text, record = read_png_metadata(base64.b64decode(out["image"]))
    assert text.startswith("a blue star") and text.endswith("Postprocess upscale by: 2, Postprocess upscaler: Lanczos")
    assert record["kind"] == "upscale"
    sized = {"image": picture, "resize_mode": 1, "upscaling_resize_w": 40, "upscaling_resize_h": 24,
             "upscaler_1": "Bicubic", "upscaler_2": "Nearest", "extras_upscaler_2_visibility": 0.5}
    r = client.post("/sdapi/v1/extra-single-image", json=sized)
    assert r.status_code == 200, r.text
    assert _png(r.json()["image"]).size == (40, 24) and "Postprocess upscaler 2: Nearest" in r.json()["html_info"]
    r = client.post("/sdapi/v1/extra-batch-images", json={"imageList": [{"data": picture, "name": "a.png"}] * 2,
                                                           "upscaling_resize": 1.5, "upscaler_1": "Lanczos"})
    assert r.status_code == 200, r.text
    assert [_png(im).size for im in r.json()["images"]] == [(24, 24)] * 2
    for bad, words in (({"gfpgan_visibility": 1}, "face restoration"), ({"upscaler_1": "None"}, "upscaler_1 is None"),
                       ({"upscaler_1": "SwinIR 4x"}, "unknown"), ({"upscaling_resize": 200}, "less than or equal"),
                       ({"tile_overlap": 8}, "unknown Extras fields"),
                       ({"image": "bm90IGFuIGltYWdl"}, "not a readable")):
        r = client.post("/sdapi/v1/extra-single-image", json={"image": picture, "upscaler_1": "Lanczos", **bad})
        assert r.status_code == 422 and words in r.json()["detail"], r.text
    r = client.post("/api/v1/upscale", json={"images": [picture], "scale": 3, "upscaler": "Bicubic"})
    assert r.status_code == 200, r.text
    assert _png(r.json()["images"][0]["base64"]).size == (48, 48)
    r = client.post("/api/v1/upscale", json={"images": [picture], "scale": 3, "upscaler": "Bicubic", "steps": 3})
    assert r.status_code == 422 and "steps" in r.json()["detail"]
    assert client.get("/api/v1/status").status_code == 200  # still serving


def test_outpainting_through_both_apis_and_a1111s_script(client):
    init = Image.new("RGB", (16, 16), (200, 30, 30))
    r = client.post("/api/v1/jobs", json={"kind": "inpaint", "init_image": _b64(init), "prompt": "a red circle",
                                          "steps": 3, "seed": 2, "outpaint_right": 8, "mask_blur": 1})
    assert r.status_code == 202, r.text
    job = _wait(client, r.json()["id"])
    assert job["status"] == "done", job
    out = _png(job["images"][0]["base64"]).convert("RGB")
    assert out.size == (24, 16) and np.array_equal(np.asarray(out)[:, :8], np.asarray(init)[:, :8])
    # A1111's "Poor man's outpainting" script: [pixels, mask_blur, inpainting_fill, directions]
    r = client.post("/sdapi/v1/img2img", json={"init_images": [_b64(init)], "prompt": "a red circle", "steps": 3,
                                               "denoising_strength": 1.0, "script_name": "Poor man's outpainting",
                                               "script_args": [8, 1, 1, ["left", "up"]]})
    assert r.status_code == 200, r.text
    out = _png(r.json()["images"][0])
    assert out.size == (24, 24)
    text = json.loads(r.json()["info"])["infotexts"][0]
    assert "Outpaint: left 8 up 8" in text and "Masked content: original" in text
    for body, words in (({"script_name": "Outpainting mk2", "script_args": [None, 8]}, "(this server runs"),
                        ({"script_name": "Poor man's outpainting", "script_args": [8, 1, 1, ["sideways"]]},
                         "directions are a list of left"),
                        ({"script_name": "Poor man's outpainting", "script_args": []}, "takes script_args")):
        r = client.post("/sdapi/v1/img2img", json={"init_images": [_b64(init)], "prompt": "x", "steps": 2, **body})
        assert r.status_code == 422 and words in r.text, r.text
    r = client.post("/api/v1/jobs", json={"kind": "img2img", "init_image": _b64(init), "prompt": "x", "steps": 2,
                                          "outpaint_left": 8})
    assert r.status_code == 422 and "grow the canvas of an inpaint request" in r.text, r.text


def test_an_edit_by_inversion_through_the_job_api(client):
    init = Image.new("RGB", (16, 16), (0, 0, 0))
    init.paste((220, 30, 30), (4, 4, 12, 12))
    body = {"kind": "edit", "init_image": _b64(init), "prompt": "a blue square", "source_prompt": "a red square",
            "steps": 3, "strength": 1.0, "seed": 4}
    r = client.post("/api/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    job = _wait(client, r.json()["id"])
    assert job["status"] == "done", job
    parameters, record = read_png_metadata(base64.b64decode(job["images"][0]["base64"]))
    assert record["kind"] == "edit" and record["settings"]["source_prompt"] == "a red square"
    assert "Source prompt: a red square" in parameters and "Sampler: DDIM" in parameters
    r = client.post("/api/v1/jobs", json={**body, "n": 2})
    assert r.status_code == 422 and "ask for n = 1" in r.text, r.text
    r = client.post("/api/v1/jobs", json={k: v for k, v in body.items() if k != "init_image"})
    assert r.status_code == 422 and "edit needs an init image" in r.text, r.text


def test_the_embedded_server_is_its_own_one_worker(client):
    """GET /api/v1/cluster (the web UI's cluster page) without a Redis queue: this process, its device and models."""
    info = client.get("/api/v1/cluster").json()
    assert info["queue"] == "embedded" and len(info["workers"]) == 1
    assert info["workers"][0]["device"] == "cpu" and info["workers"][0]["models"]
    assert client.get("/api/v1/status").json()["queue"] == "embedded"


def test_a_queue_url_that_is_no_redis_stops_the_start_with_the_reason(models, tmp_path):
    with pytest.raises(ValueError, match="takes a Redis URL"):
        create_app(models[:1], out_dir=tmp_path, queue="http://localhost:1")
    with pytest.raises(ValueError, match="cannot reach the queue's Redis server"):
        create_app(models[:1], out_dir=tmp_path, queue="redis://127.0.0.1:1/0")
