"""AUTOMATIC1111's vocabulary, in one place: what its users write and read, as imagine understands it.

Prompt syntax (the ``<lora:NAME:WEIGHT>`` tag, emphasis and BREAK), sampler and scheduler names, the
infotext it writes into PNGs (both ways), sd-webui-controlnet's preprocessor names, control modes and unit
fields, and its API's option and field names. Pure Python, at the bottom of the house, so every layer that
speaks A1111 (the text encoders, the samplers, the pipeline's records, the server's endpoints) reads the
same tables; server/a1111.py translates A1111's payloads into the typed request with them.
"""

from __future__ import annotations

import json
import re
from typing import Any

# --- prompts ----------------------------------------------------------------------------------------------

# A1111's extra-network syntax in a prompt: <lora:NAME> or <lora:NAME:WEIGHT> (also <lyco:...>)
_TAG = re.compile(r"<(?:lora|lyco):([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")


def prompt_loras(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """(the prompt without its <lora:NAME:WEIGHT> tags, [(NAME, WEIGHT)]), as A1111 reads them: the weight
    defaults to 1, and the tags are taken out of the text before it is encoded.

    >>> prompt_loras("a <lora:sks-style:0.8> cat, <lora:other>")
    ('a  cat, ', [('sks-style', 0.8), ('other', 1.0)])"""
    found = []
    for match in _TAG.finditer(prompt):
        weight = match.group(2)
        try:
            found.append((match.group(1).strip(), float(weight) if weight not in (None, "") else 1.0))
        except ValueError:
            raise ValueError(f"LoRA tag {match.group(0)!r}: the weight must be a number") from None
    return _TAG.sub("", prompt), found


BREAK = -1.0  # weight marking a BREAK in parsed prompts

_TOKEN = re.compile(r"\\\(|\\\)|\\\[|\\\]|\\\\|\\|\(|\[|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)|\)|\]|[^\\()\[\]:]+|:")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """A1111's emphasis syntax -> [(text, weight)], adjacent equal weights merged.

    >>> parse_prompt_attention("a (red:1.5) [circle] (big)")
    [('a ', 1.0), ('red', 1.5), (' ', 1.0), ('circle', 0.9090909090909091), (' ', 1.0), ('big', 1.1)]
    Unclosed brackets apply to the end; ``BREAK`` yields ("BREAK", -1)."""
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for item in res[start:]:
            item[1] *= factor

    for match in _TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\") and len(token) == 2:
            res.append([token[1], 1.0])
        elif token == "\\":
            res.append(["\\", 1.0])
        elif token == "(":
            round_open.append(len(res))
        elif token == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            scale(round_open.pop(), 1.1)
        elif token == "]" and square_open:
            scale(square_open.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(re.split(r"\s*\bBREAK\b\s*", token)):
                if i > 0:
                    res.append(["BREAK", BREAK])
                if part:
                    res.append([part, 1.0])
    for start in round_open:
        scale(start, 1.1)
    for start in square_open:
        scale(start, 1 / 1.1)
    if not res:
        return [("", 1.0)]
    merged = [res[0]]
    for text_, w in res[1:]:
        if w == merged[-1][1] and w != BREAK:
            merged[-1][0] += text_
        else:
            merged.append([text_, w])
    return [(t, w) for t, w in merged]


# --- samplers and schedulers ------------------------------------------------------------------------------

# AUTOMATIC1111's names -> (our sampler, sigma schedule). Older A1111 versions fold the schedule
# into the name ("DPM++ 2M Karras"); newer ones write it separately as "Schedule type: Karras".
A1111_NAMES: dict[str, tuple[str, str]] = {
    "DDPM": ("ddpm", "default"),
    "DDIM": ("ddim", "default"),
    "Euler": ("euler", "default"),
    "Euler a": ("euler_a", "default"),
    "Heun": ("heun", "default"),
    "LMS": ("lms", "default"),
    "LMS Karras": ("lms", "karras"),
    "DPM++ 2M": ("dpmpp_2m", "default"),
    "DPM++ 2M Karras": ("dpmpp_2m", "karras"),
    "DPM++ 2M SDE": ("dpmpp_2m_sde", "default"),
    "DPM++ 2M SDE Karras": ("dpmpp_2m_sde", "karras"),
    "UniPC": ("unipc", "default"),
    "LCM": ("lcm", "default"),
}

# A1111's "Schedule type" values we implement.
A1111_SCHEDULE_TYPES: dict[str, str] = {"Automatic": "default", "Uniform": "default", "Karras": "karras"}


def a1111_aliases(name: str) -> list[str]:
    """A1111 display names that select sampler ``name``."""
    return [alias for alias, (sampler, _) in A1111_NAMES.items() if sampler == name]


def a1111_name(sampler: str) -> str:
    """The A1111 display name for a sampler (without the schedule, as A1111 1.9+ writes it)."""
    return next(alias for alias, (s, sched) in A1111_NAMES.items() if s == sampler and sched == "default")


# A1111's schedulers (modules/sd_schedulers.py) that we implement: name -> (label, our schedule or None for
# "the sampler's own", default rho)
SCHEDULERS = {"automatic": ("Automatic", None, -1.0), "uniform": ("Uniform", "default", -1.0),
              "karras": ("Karras", "karras", 7.0)}


# --- infotext: the "parameters" text of a PNG --------------------------------------------------------------

_KV = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _quote(value: str) -> str:
    """Quote a value that holds the separators, as A1111 does."""
    return json.dumps(value) if ("," in value or ":" in value or "\n" in value) else value


def a1111_parameters(prompt: str, negative: str, fields: dict[str, Any]) -> str:
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join(f"{k}: {_quote(str(v))}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


def parse_a1111(text: str) -> dict[str, Any]:
    """A1111's ``parameters`` text -> {"Prompt": ..., "Negative prompt": ..., "Steps": "20", ...}.

    The last line holding ``Steps:`` starts the key-value list; lines before it are the prompt, up to a
    line starting ``Negative prompt:``. Quoted values are unquoted."""
    lines = text.strip().split("\n")
    kv_line = ""
    if lines and re.match(r"^\s*Steps:", lines[-1]):
        kv_line = lines.pop()
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out: dict[str, Any] = {"Prompt": "\n".join(prompt).strip(), "Negative prompt": "\n".join(negative).strip()}
    for key, value in _KV.findall(kv_line):
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = value[1:-1]
        out[key.strip()] = value
    return out


RESIZE_LABELS = {"just_resize": "Just resize", "crop_and_resize": "Crop and resize",
                 "resize_and_fill": "Resize and fill", "latent_upscale": "Just resize (latent upscale)"}


# --- sd-webui-controlnet ----------------------------------------------------------------------------------

# sd-webui-controlnet's preprocessor names that mean one of ours
MODULE_ALIASES = {"canny": "canny", "scribble_hed": "scribble", "scribble_pidinet": "scribble",
                  "scribble_xdog": "scribble", "seg_ofade20k": "segmentation", "seg_ufade20k": "segmentation",
                  "seg_ofcoco": "segmentation", "openpose": "keypoints", "tile_resample": "tile", "none": "none"}

MODE_LABELS = {"balanced": "Balanced", "prompt": "My prompt is more important",
               "control": "ControlNet is more important"}

RESIZE_NAMES = {"just resize": "just_resize", "crop and resize": "crop_and_resize", "resize and fill":
                "resize_and_fill", "inner fit (scale to fit)": "crop_and_resize",
                "outer fit (shrink to fit)": "resize_and_fill", "0": "just_resize", "1": "crop_and_resize",
                "2": "resize_and_fill", "envelope (outer fit)": "resize_and_fill"}

# sd-webui-controlnet's unit fields (external_code.ControlNetUnit) and what they become in our units
UNIT_FIELDS = {"enabled", "image", "input_image", "mask", "module", "model", "weight", "guidance_start",
                "guidance_end", "control_mode", "resize_mode", "processor_res", "threshold_a", "threshold_b",
                "pixel_perfect", "low_vram", "guess_mode", "lowvram", "save_detected_map", "hr_option",
                "effective_region_mask", "input_mode", "batch_images", "output_dir", "loopback", "is_ui"}
CONTROL_MODE_INDEX = {0: "balanced", 1: "prompt", 2: "control"}


def module_for(encoder: str | None) -> str:
    """sd-webui-controlnet's preprocessor name for an encoder (it names IP-Adapter units by it)."""
    if encoder in ("palette", "intensity"):
        return f"ip-adapter_{encoder}"
    if encoder == "shapes-clip":
        return "ip-adapter_shapes_clip"
    return "ip-adapter_clip"


def a1111_field(record: dict) -> str:
    """A unit as A1111's ControlNet extension writes it in the parameters text."""
    def num(v):
        return f"{v:g}" if isinstance(v, float) else v

    resize = {"just_resize": "Just Resize", "crop_and_resize": "Crop and Resize",
              "resize_and_fill": "Resize and Fill"}[record["resize_mode"]]
    parts = [f"Module: {record['module']}", f"Model: {record['model']} [{record['sha256_10'] or ''}]",
             f"Weight: {num(record['weight'])}", f"Resize Mode: {resize}",
             f"Processor Res: {record['processor_res']}"]
    if record.get("threshold_a") is not None:
        parts.append(f"Threshold A: {num(record['threshold_a'])}")
    if record.get("threshold_b") is not None:
        parts.append(f"Threshold B: {num(record['threshold_b'])}")
    parts += [f"Guidance Start: {num(record['start'])}", f"Guidance End: {num(record['end'])}",
              f"Pixel Perfect: {record['pixel_perfect']}", f"Control Mode: {MODE_LABELS[record['mode']]}"]
    return ", ".join(parts)  # the PNG writer quotes it, as A1111 does


def ip_adapter_field(record: dict) -> str:
    """An image prompt as sd-webui-controlnet writes an IP-Adapter unit in the parameters text."""
    return (f"Module: {module_for(record['encoder'])}, Model: {record['model']} [{record['sha256_10'] or ''}], "
            f"Weight: {record['scale']:g}, Resize Mode: Crop and Resize, Processor Res: 512, "
            f"Guidance Start: {record['start']:g}, Guidance End: {record['end']:g}, Pixel Perfect: False, "
            "Control Mode: Balanced")


# --- the API: options and fields --------------------------------------------------------------------------

# A1111's /sdapi/v1/options that change results here, with their defaults
A1111_OPTIONS: dict[str, Any] = {"samples_format": "png", "CLIP_stop_at_last_layers": 1, "eta_noise_seed_delta": 0,
                                  "sd_vae": "Automatic", "forge_additional_modules": [],
                                  "inpainting_mask_weight": 1.0}


# A1111 request fields that change results and that imagine does not implement: accepted only at a value
# that does nothing (their defaults), refused otherwise with a 422 that names them.
UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "subseed_strength": ((0, 0.0, None), "variation seeds"),
    "seed_resize_from_h": ((-1, 0, None), "seed resize"),
    "seed_resize_from_w": ((-1, 0, None), "seed resize"),
    "restore_faces": ((False, None), "face restoration (it needs GFPGAN/CodeFormer weights)"),
    "tiling": ((False, None), "tiling"),
    "s_churn": ((0, 0.0, None), "sampler churn"),
    "s_tmin": ((0, 0.0, None), "sampler churn range"),
    "s_tmax": ((None, 0, 0.0), "sampler churn range"),
    "s_noise": ((1, 1.0, None), "sampler noise multiplier"),
    "s_min_uncond": ((0, 0.0, None), "negative guidance minimum sigma"),
    "initial_noise_multiplier": ((1, 1.0, None), "initial noise multiplier"),
    "firstpass_image": ((None, ""), "a first-pass image"),
    "infotext": ((None, ""), "infotext parameters"),
    "latent_mask": ((None, ""), "a separate latent mask"),
}
# Fields that change nothing here (or only alongside a refused one above): accepted quietly.
NO_EFFECT = frozenset({
    "send_images", "save_images", "do_not_save_samples", "do_not_save_grid", "disable_extra_networks", "comments",
    "force_task_id", "override_settings_restore_afterwards", "subseed", "script_args",
    "firstphase_width", "firstphase_height", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x",
    "hr_resize_y", "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt",
    "enable_hr", "hr_cfg", "hr_distilled_cfg", "hr_additional_modules",
    "mask_round", "include_init_images", "sampler_index", "batch_size", "n_iter",
    "refiner_checkpoint", "refiner_switch_at",  # read by the server's A1111 door (its refiner)
})
# override_settings keys (and /options) applied per request
OVERRIDES = ("sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers", "eta_noise_seed_delta", "samples_format",
             "forge_additional_modules",  # Forge's: separate text encoder and VAE files
             "inpainting_mask_weight",  # inpainting models' conditioning mask strength
             "imagine_backend", "imagine_tile")  # ours: torch, onnxruntime or onnxruntime-int8; tile size in pixels


# what hires fix's second pass may be told apart from the first, and the values that mean "the same"
HIRES_SAME = {"hr_checkpoint_name": (None, "", "Use same checkpoint"),
              "hr_sampler_name": (None, "", "Use same sampler"), "hr_scheduler": (None, "", "Use same scheduler"),
              "hr_prompt": (None, ""), "hr_negative_prompt": (None, ""), "hr_cfg": (None,),
              "hr_distilled_cfg": (None,), "hr_additional_modules": (None, [])}

