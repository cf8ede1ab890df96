"""The server keeps its promises under heavy inputs and restarts: jobs survive a kill -9, the event loop
never blocks on decoding or model loading, finished jobs are bounded in bytes and let go of their inputs,
models load once, and A1111 fields are honoured or refused, never silently ignored."""

from __future__ import annotations

import base64
import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from imagine.server import Limits, create_app


def _b64(img: Image.Image) -> str:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, timeout=60, every=0.02, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def _serve(model_dir, out, port):
    return subprocess.Popen([sys.executable, "-m", "imagine", "serve", "--model", str(model_dir), "--out", str(out),
                             "--port", str(port), "--max-steps", "1000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _up(base):
    def ready():
        try:
            return httpx.get(f"{base}/api/v1/status", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False
    return ready


def test_jobs_survive_a_kill_and_restart(tiny_t2i_dir, tmp_path):
    """kill -9 mid-job: after a restart the done job is listed with its images, the queued ones run, and
    the one that was running is failed with the reason, never lost silently."""
    port, out = _free_port(), tmp_path / "outputs"
    base = f"http://127.0.0.1:{port}"
    server = _serve(tiny_t2i_dir, out, port)
    try:
        _wait_for(_up(base), 120, 0.2, "the server")
        quick = {"prompt": "a red circle", "steps": 3, "seed": 1}
        done_id = httpx.post(f"{base}/api/v1/jobs", json=quick).json()["id"]
        _wait_for(lambda: httpx.get(f"{base}/api/v1/jobs/{done_id}").json()["status"] == "done", what="job 1")
        long_id = httpx.post(f"{base}/api/v1/jobs", json={**quick, "steps": 1000, "n": 8}).json()["id"]
        queued = [httpx.post(f"{base}/api/v1/jobs", json={**quick, "seed": 10 + i}).json()["id"] for i in range(2)]
        _wait_for(lambda: httpx.get(f"{base}/api/v1/jobs/{long_id}?base64=false").json()["step"] >= 2,
                  what="the long job to run")
        server.send_signal(signal.SIGKILL)
        server.wait(30)
        assert server.returncode == -signal.SIGKILL
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{base}/api/v1/status", timeout=1)
    finally:
        server.kill()
    server = _serve(tiny_t2i_dir, out, port)
    try:
        _wait_for(_up(base), 120, 0.2, "the restarted server")
        done = httpx.get(f"{base}/api/v1/jobs/{done_id}").json()
        assert done["status"] == "done" and len(done["images"]) == 1 and done["images"][0]["base64"]
        assert httpx.get(done["images"][0]["url"]).content[:8] == b"\x89PNG\r\n\x1a\n"
        running = httpx.get(f"{base}/api/v1/jobs/{long_id}").json()
        assert running["status"] == "failed" and "server stopped while this job was running" in running["error"]
        for job_id, seed in zip(queued, (10, 11), strict=True):
            job = _wait_for(lambda j=job_id: (r := httpx.get(f"{base}/api/v1/jobs/{j}").json())["status"] == "done"
                            and r, what="a queued job to run after the restart")
            assert job["images"][0]["seed"] == seed
    finally:
        server.kill()
        server.wait(30)


@pytest.fixture()
def live_server(tiny_t2i_dir, tmp_path_factory, monkeypatch):
    """The app under uvicorn in this process (a real socket and event loop), two models, the second one's
    load made slow (2 s) so a test can watch the server while it loads."""
    import shutil

    import uvicorn

    import imagine.server.models as store_module  # the model store calls the loader it imported

    slow = tmp_path_factory.mktemp("slow") / "slow-model"
    shutil.copytree(tiny_t2i_dir, slow)
    real = store_module.load_text_model

    def load(path, **options):
        if "slow-model" in str(path):
            time.sleep(2.0)
        return real(path, **options)

    monkeypatch.setattr(store_module, "load_text_model", load)
    app = create_app([tiny_t2i_dir, slow], out_dir=None, limits=Limits(max_steps=1000))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    _wait_for(_up(base), 60, 0.05, "uvicorn")
    yield base, app
    server.should_exit = True
    thread.join(30)


def test_the_event_loop_answers_while_a_large_image_decodes_and_a_model_loads(live_server):
    base, _ = live_server
    long_job = httpx.post(f"{base}/api/v1/jobs", json={"prompt": "a red circle", "steps": 1000, "n": 4}).json()["id"]
    events, stop = [], threading.Event()

    def listen():  # an SSE stream of the long job: its events must keep coming
        with httpx.stream("GET", f"{base}/api/v1/jobs/{long_job}/events", timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("event:"):
                    events.append(time.perf_counter())
                if stop.is_set():
                    return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    _wait_for(lambda: len(events) >= 3, what="SSE events")
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 255, (1400, 1400, 3), dtype=np.uint8))  # about 8 MB of base64
    body = {"prompt": "a blue square", "init_images": [_b64(big)], "steps": 2, "width": 16, "height": 16,
            "override_settings": {"sd_model_checkpoint": "slow-model"}}
    result: dict = {}

    def heavy():
        t = time.perf_counter()
        result["response"] = httpx.post(f"{base}/sdapi/v1/img2img", json=body, timeout=120)
        result["seconds"] = time.perf_counter() - t

    worker = threading.Thread(target=heavy)
    t0 = time.perf_counter()
    worker.start()
    latencies, queued_at = [], None
    while queued_at is None and time.perf_counter() - t0 < 60:  # until the img2img job is built and queued
        t = time.perf_counter()
        r = httpx.get(f"{base}/sdapi/v1/progress?skip_current_image=true", timeout=5)
        latencies.append(time.perf_counter() - t)
        assert r.status_code == 200
        if r.json()["state"]["job_count"] >= 2:  # the long job running, the img2img one queued behind it
            queued_at = time.perf_counter()
        time.sleep(0.05)
    window = [e for e in events if t0 <= e <= (queued_at or t0)]
    stop.set()
    httpx.delete(f"{base}/api/v1/jobs/{long_job}")  # let the img2img job run now
    worker.join(120)
    assert result["response"].status_code == 200, result["response"].text
    assert queued_at is not None and queued_at - t0 >= 2.0  # decoding and the slow load happened in the window
    assert len(latencies) >= 10 and max(latencies) < 0.5, max(latencies)
    gaps = np.diff([t0, *window, queued_at])
    assert len(window) >= 5 and gaps.max() < 1.0, (len(window), gaps.max())  # the stream never stalled


def test_finished_jobs_release_inputs_and_are_bounded_in_bytes(tiny_t2i_dir):
    app = create_app([tiny_t2i_dir], out_dir=None, limits=Limits(max_kept_bytes=4000))
    service = app.state.service
    init = _b64(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    with TestClient(app) as client:
        ids = []
        for seed in range(6):
            r = client.post("/api/v1/jobs", json={"kind": "img2img", "prompt": "x", "steps": 2, "seed": seed,
                                                  "init_image": init, "width": 16, "height": 16})
            ids.append(r.json()["id"])
            job = service.queue.get(ids[-1])
            live = job
            _wait_for(lambda j=live: j.done, what="the job")
            assert live.inputs == {}  # the decoded init image is let go when the job ends
        store = service.queue.store
        assert store.kept_bytes() <= 4000
        kept = [i for i in ids if client.get(f"/api/v1/jobs/{i}").status_code == 200]
        assert kept and kept == ids[-len(kept):] and len(kept) < len(ids)  # the oldest went first
        assert service.queue._live == {}  # nothing finished stays in memory


def test_models_load_once_and_not_at_start_up(tiny_t2i_dir):
    app = create_app([tiny_t2i_dir], out_dir=None)
    store = app.state.service.store
    assert store.loads == 0  # start-up reads the spec only
    with TestClient(app) as client:
        for seed in range(3):
            r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "seed": seed})
            assert r.status_code == 200, r.text
        assert client.get("/api/v1/status").json()["models_loaded"] == 1


def test_a1111_fields_are_honoured_or_refused(tiny_t2i_dir):
    app = create_app([tiny_t2i_dir], out_dir=None)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8))
    mask = Image.new("L", (32, 24))
    mask.paste(255, (8, 8, 16, 16))
    base = {"prompt": "a red circle", "steps": 2, "seed": 4, "init_images": [_b64(img)]}
    with TestClient(app) as client:
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "enable_hr": True,
                                                   "hr_checkpoint_name": "other.safetensors"})
        assert r.status_code == 422 and "hr_checkpoint_name" in r.json()["detail"]  # hires fix itself is run
        for field, value in (("restore_faces", True), ("subseed_strength", 0.5),
                             ("tiling", True), ("s_churn", 1.0), ("styles", ["cinematic"]),
                             ("alwayson_scripts", {"adetailer": {"args": []}})):  # ControlNet's are run
            r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, field: value})
            assert r.status_code == 422 and field in r.json()["detail"], (field, r.text)
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 2, "restore_faces": False,
                                                   "tiling": False, "eta": 0, "s_noise": 1.0, "my_extension_flag": 3})
        assert r.status_code == 200 and r.json()["warnings"] == ["unknown field 'my_extension_flag' ignored"]
        for override in ({"samples_format": "jpg"}, {"sd_hypernetwork": "x.pt"}):
            r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "override_settings": override})
            assert r.status_code == 422 and next(iter(override)) in r.json()["detail"]
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "override_settings": {"sd_vae": "x.pt"}})
        assert r.status_code == 404 and "VAE 'x.pt' unknown; choose Automatic" in r.json()["detail"]
        # honoured: clip skip from override_settings, resize mode, inpaint options (each in the infotext)
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2,
                                                   "override_settings": {"CLIP_stop_at_last_layers": 2}})
        assert r.status_code == 200 and "Clip skip: 2" in json.loads(r.json()["info"])["infotexts"][0]
        assert json.loads(r.json()["info"])["clip_skip"] == 2
        r = client.post("/sdapi/v1/img2img", json={**base, "resize_mode": 1, "width": 16, "height": 16})
        assert r.status_code == 200 and "Resize mode: Crop and resize" in json.loads(r.json()["info"])["infotexts"][0]
        r = client.post("/sdapi/v1/img2img", json={**base, "mask": _b64(mask), "inpainting_fill": 0,
                                                   "inpaint_full_res": True, "inpaint_full_res_padding": 4,
                                                   "inpainting_mask_invert": 0, "width": 16, "height": 16,
                                                   "mask_blur": 0})
        assert r.status_code == 200, r.text
        text = json.loads(r.json()["info"])["infotexts"][0]
        assert "Inpaint area: Only masked" in text and "Masked content: fill" in text
        out = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
        assert out.shape == (24, 32, 3)  # only masked: the init image's size
        kept = np.ones((24, 32), bool)
        kept[8:16, 8:16] = False
        np.testing.assert_array_equal(out[kept], np.asarray(img)[kept])
        r = client.post("/sdapi/v1/img2img", json={**base, "resize_mode": 7})
        assert r.status_code == 422 and "resize_mode" in r.json()["detail"]
        assert client.post("/sdapi/v1/options", json={"samples_format": "webp"}).status_code == 400
        assert client.post("/sdapi/v1/options", json={"eta_noise_seed_delta": 31337}).status_code == 200
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "sampler_name": "Euler a"})
        assert "ENSD: 31337" in json.loads(r.json()["info"])["infotexts"][0]


def test_serve_help_names_the_kept_bound():
    run = subprocess.run([sys.executable, "-m", "imagine", "serve", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert "--max-kept-mb" in run.stdout
