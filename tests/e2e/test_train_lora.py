"""`imagine train-lora`: a LoRA learns on a frozen model (the base weights never move), resumes exactly,
and the file it writes is used by `imagine generate --lora`."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import load_file

from imagine.data.images import load_dataset
from imagine.pipelines.request import load_text_model
from imagine.train.lora import LoraTrainConfig, train_lora
from tests.e2e.inprocess import imagine


def _run(argv, **_):
    """`python -m imagine ...` (as subprocess.run takes it) in-process: tests/e2e/inprocess.py."""
    assert argv[:3] == [sys.executable, "-m", "imagine"], argv
    return imagine(*argv[3:])


def _train(model_dir, out, steps, resume=False):
    model, encoder = load_text_model(model_dir)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    data = load_dataset("builtin:shapes", model.spec.image_size, captions=True)
    cfg = LoraTrainConfig(rank=2, steps=4, batch_size=2, lr=1e-3, checkpoint_every=2, targets="attn+ff")
    if steps < cfg.steps:  # stop early, as a killed run would
        cfg = LoraTrainConfig(**{**cfg.__dict__, "steps": steps})
    train_lora(model, encoder, data, cfg if not resume else LoraTrainConfig(**{**cfg.__dict__, "steps": 4}), out,
               resume=resume)
    assert all(torch.equal(before[k], v) for k, v in model.unet.state_dict().items())  # the base is frozen
    return load_file(out)


def test_lora_training_learns_on_a_frozen_model_and_resumes_exactly(tiny_t2i_dir, tmp_path):
    straight = _train(tiny_t2i_dir, tmp_path / "a.safetensors", 4)
    assert any(k.endswith(".lora_up.weight") and v.abs().sum() > 0 for k, v in straight.items())  # B moved off 0
    _train(tiny_t2i_dir, tmp_path / "b.safetensors", 2)
    resumed = _train(tiny_t2i_dir, tmp_path / "b.safetensors", 4, resume=True)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_train_lora_cli_writes_a_file_generate_uses(tiny_t2i_dir, tmp_path):
    out = tmp_path / "style.safetensors"
    run = _run([sys.executable, "-m", "imagine", "train-lora", "--model", str(tiny_t2i_dir), "--data",
                          "builtin:shapes", "--out", str(out), "--steps", "3", "--batch-size", "2", "--rank", "2",
                          "--sample-prompt", "a red circle", "--device", "cpu"], capture_output=True, text=True,
               timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    root = tmp_path / "style-training"
    assert out.exists() and (root / "loss.png").exists() and (root / "samples" / "step_0000003.png").exists()
    assert any(k.startswith("lora_unet_") for k in load_file(out))
    gen = _run([sys.executable, "-m", "imagine", "generate", "a red circle", "--model", str(tiny_t2i_dir),
                          "--lora", f"{out}:0.8", "--steps", "3", "--out", str(tmp_path / "img")],
                         capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr[-2000:]
    bad = _run([sys.executable, "-m", "imagine", "train-lora", "--model", str(tiny_t2i_dir), "--data",
                          "builtin:shapes", "--out", str(tmp_path / "x.safetensors"), "--targets", "every"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "LoRA targets 'every' unknown" in bad.stderr
    if not torch.cuda.is_available():  # a device that is not there: one line, before any work
        gpu = _run([sys.executable, "-m", "imagine", "train-lora", "--model", str(tiny_t2i_dir), "--data",
                    "builtin:shapes", "--out", str(tmp_path / "g.safetensors"), "--device", "cuda"],
                   capture_output=True, text=True, timeout=300)
        assert gpu.returncode == 2 and "no CUDA GPU" in gpu.stderr and "Traceback" not in gpu.stderr
        assert not (tmp_path / "g.safetensors").exists()


def test_text_encoder_lora_trains_through_the_encoder(tmp_path):
    import pytest

    pytest.importorskip("diffusers")
    from tests.tiny_sd import write_pipeline

    write_pipeline("sd1", tmp_path / "sd1")
    model, encoder = load_text_model(tmp_path / "sd1")
    text_before = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    data = load_dataset("builtin:shapes", model.spec.image_size, captions=True)
    cfg = LoraTrainConfig(rank=2, steps=2, batch_size=2, lr=1e-2, text_encoder=True)
    tensors = load_file(train_lora(model, encoder, data, cfg, tmp_path / "te.safetensors"))
    te_up = [v for k, v in tensors.items() if k.startswith("lora_te_") and k.endswith("lora_up.weight")]
    assert te_up and all(v.abs().sum() > 0 for v in te_up)  # gradients reached the text encoder's updates
    assert all(torch.equal(text_before[k], v) for k, v in encoder.model.state_dict().items())


def test_dreambooth_adds_the_prior_loss_on_cached_class_images(tiny_t2i_dir, tmp_path):
    from PIL import Image

    from imagine.train.lora import class_images

    instances = tmp_path / "subject"
    instances.mkdir()
    for i, colour in enumerate(["red", "orange", "magenta"]):  # a few "photos" of the subject
        Image.new("RGB", (32, 32), colour).save(instances / f"{i}.png")
    out = tmp_path / "sks.safetensors"
    args = [sys.executable, "-m", "imagine", "dreambooth", "--model", str(tiny_t2i_dir), "--instance-data",
            str(instances), "--instance-prompt", "a sks shape", "--class-prompt", "a shape", "--num-class-images", "3",
            "--out", str(out), "--steps", "2", "--lora", "2"]
    run = _run(args, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    cached = sorted((tmp_path / "sks-training" / "class_images").glob("*.png"))
    assert [p.name for p in cached] == ["000000.png", "000001.png", "000002.png"]
    stamps = [p.stat().st_mtime_ns for p in cached]
    model, encoder = load_text_model(tiny_t2i_dir)
    prior = class_images(model, encoder, "a shape", 3, tmp_path / "sks-training" / "class_images")
    assert [p.stat().st_mtime_ns for p in cached] == stamps  # reused, not drawn again
    assert prior.captions == ("a shape",) * 3 and prior.images.shape[0] == 3
    other = class_images(model, encoder, ["a shape", "a circle"], 3, tmp_path / "sks-training" / "class_images")
    assert other.captions == ("a shape", "a circle", "a shape")  # several class prompts cycle
    assert [p.stat().st_mtime_ns for p in cached][::2] == stamps[::2]  # same prompt and seed: kept
    assert cached[1].stat().st_mtime_ns != stamps[1]  # another prompt for that seed: drawn again
    prior = class_images(model, encoder, "a shape", 3, tmp_path / "sks-training" / "class_images")
    # the prior term is in the loss: with it the LoRA learns differently than without it
    data = load_folder_with(instances, model.spec.image_size, "a sks shape")
    cfg = LoraTrainConfig(rank=2, steps=2, batch_size=2, lr=1e-2, prior_weight=1.0)
    with_prior = load_file(train_lora(model, encoder, data, cfg, tmp_path / "p.safetensors", prior=prior))
    without = load_file(train_lora(model, encoder, data, cfg, tmp_path / "n.safetensors"))
    assert any(not torch.equal(with_prior[k], without[k]) for k in with_prior)
    no_class = _run(args[:10] + args[12:], capture_output=True, text=True, timeout=300)  # no --class-prompt
    assert no_class.returncode == 2 and "prior preservation needs --class-prompt" in no_class.stderr


def load_folder_with(folder, size, prompt):
    from imagine.data.images import load_folder

    data = load_folder(folder, size)
    data.captions = (prompt,) * len(data)
    return data


def test_dreambooth_full_fine_tunes_the_unet_and_writes_a_model(tiny_t2i_dir, tmp_path):
    from PIL import Image

    from imagine.data.images import load_folder

    instances = tmp_path / "subject"
    instances.mkdir()
    for i, colour in enumerate(["red", "orange"]):
        Image.new("RGB", (32, 32), colour).save(instances / f"{i}.png")
    (instances / "1.txt").write_text("an orange sks shape")  # an image's own prompt beats --instance-prompt
    data = load_folder(instances, 16, captions=True, default_caption="a sks shape")
    assert data.captions == ("a sks shape", "an orange sks shape")
    out = tmp_path / "sks-model"
    run = _run([sys.executable, "-m", "imagine", "dreambooth", "--model", str(tiny_t2i_dir),
                          "--instance-data", str(instances), "--instance-prompt", "a sks shape", "--class-prompt",
                          "a shape", "--num-class-images", "2", "--out", str(out), "--steps", "2", "--full",
                          "--lr", "1e-3"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "sks-model-training" / "class_images" / "000001.png").exists()
    base, _ = load_text_model(tiny_t2i_dir)
    tuned, _ = load_text_model(out)
    before, after = base.unet.state_dict(), tuned.unet.state_dict()
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    gen = _run([sys.executable, "-m", "imagine", "generate", "a sks shape", "--model", str(out), "--steps",
                          "2", "--out", str(tmp_path / "img")], capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr[-2000:]
    mixed = _run([sys.executable, "-m", "imagine", "dreambooth", "--model", str(tiny_t2i_dir),
                            "--instance-data", str(instances), "--instance-prompt", "a sks shape", "--prior-weight",
                            "0", "--out", str(out), "--full", "--text-encoder"], capture_output=True, text=True)
    assert mixed.returncode == 2 and "--targets and --algo are LoRA options" in mixed.stderr


@pytest.mark.parametrize("algo", ["loha", "lokr", "dora"])
def test_lycoris_kinds_train_and_their_files_read_back(algo, tiny_t2i_dir, tmp_path):
    """train-lora --algo loha|lokr|dora: the update starts at nothing (the frozen model's output), learns, and
    the file it writes, in LyCORIS's layout (kohya names, LyCORIS's tensor names, ss_network_module), reads
    back through --lora to the very update it held; resuming gives the same file as a straight run."""
    from safetensors import safe_open

    from imagine.adapters.lora import attach, create, parts_of
    from imagine.io.lora_keys import load_lora

    model, encoder = load_text_model(tiny_t2i_dir)
    parts = parts_of(model, encoder)
    fresh = create(parts, rank=2, targets="attn+ff", algo=algo)
    x, t = torch.randn(2, model.unet.config.in_channels, 8, 8), torch.tensor([500, 500])
    ctx = torch.randn(2, 77, model.unet.config.cross_attention_dim)
    with torch.no_grad():
        base = model.unet(x, t, ctx)
        handle = attach(parts, [(fresh, 1.0)])
        start = model.unet(x, t, ctx)  # dW = 0 at the start (DoRA's: m W / ||W|| - W, zero up to rounding)
        assert torch.equal(start, base) if algo != "dora" else (start - base).abs().max() < 1e-5
        handle.detach()
    data = load_dataset("builtin:shapes", model.spec.image_size, captions=True)
    cfg = LoraTrainConfig(rank=2, steps=4, batch_size=2, lr=1e-2, checkpoint_every=2, targets="attn+ff", algo=algo)
    out = train_lora(model, encoder, data, cfg, tmp_path / f"{algo}.safetensors")
    tensors = load_file(out)
    suffix = {"loha": ".hada_w2_a", "lokr": ".lokr_w1", "dora": ".dora_scale"}[algo]
    assert any(k.startswith("lora_unet_down_blocks_") and k.endswith(suffix) for k in tensors), sorted(tensors)[:6]
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya" and algo in meta["ss_network_args"]
    loaded = load_lora(out, parts)
    with torch.no_grad():
        handle = attach(parts, [(loaded, 1.0)])
        moved = model.unet(x, t, ctx)
        handle.detach()
    assert (moved - base).abs().max() > 1e-4  # it learned something, and the file carries it
    short = LoraTrainConfig(**{**cfg.__dict__, "steps": 2})
    train_lora(model, encoder, data, short, tmp_path / "resumed.safetensors")
    resumed = train_lora(model, encoder, data, cfg, tmp_path / "resumed.safetensors", resume=True)
    again = load_file(resumed)
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)
