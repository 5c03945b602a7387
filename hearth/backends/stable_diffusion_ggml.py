"""Image generation with stable-diffusion.cpp (LocalAI's `stablediffusion-ggml`): GGUF and safetensors checkpoints,
or a diffusers folder, through stable-diffusion-cpp-python; and models split into parts, as LocalAI passes them.

Options from the model YAML: `step` (default steps), `cfg_scale`, `sampler` (stable-diffusion.cpp's sample method,
e.g. euler_a), `sizes` (the exact WxH sizes allowed; default: both sides multiples of 64 from 64 to 2048, as
stable-diffusion.cpp wants). LocalAI's `options` list: `diffusion_model` (the model file is the diffusion model
alone, for Flux, SD3, Wan, Z-Image…), each `*_path` part (`vae_path`, `clip_l_path`, `clip_g_path`, `t5xxl_path`,
`llm_path`, … files in the models directory, checked by the config loader and handed over as `spec.files`),
`sampler:` and `scheduler:`, `flow_shift:`, and stable-diffusion.cpp's switches (`offload_params_to_cpu`,
`keep_clip_on_cpu`, `keep_vae_on_cpu`, `vae_decode_only`, `flash_attn`, `diffusion_flash_attn`, …).
"""

from __future__ import annotations

import ctypes
import io
import logging
import math
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hearth.backends.base import Backend as BaseBackend
from hearth.backends.base import LoadSpec, ModelDescription, need
from hearth.backends.diffusers_backend import (
    GeneratedImage,
    ImageProgress,
    ImageSpec,
    as_pngs,
    run_with_progress,
)
from hearth.config.schema import SD_PATH_OPTIONS, parse_options
from hearth.errors import BackendError, InvalidRequest, ModelLoadFailed

log = logging.getLogger("hearth.runner.sdcpp")

SUGGESTED_SIZES = ["512x512", "256x256", "768x768", "1024x1024"]
# LocalAI's option names for stable-diffusion.cpp's switches, as StableDiffusion() takes them.
SWITCHES = ("offload_params_to_cpu", "keep_clip_on_cpu", "keep_vae_on_cpu", "keep_control_net_on_cpu",
            "vae_decode_only", "flash_attn", "diffusion_flash_attn", "diffusion_conv_direct", "vae_conv_direct",
            "enable_mmap")
SD_LOG_INFO, SD_LOG_ERROR = 1, 3


class _SdLog:
    """stable-diffusion.cpp's log: passed on to the runner's output (so to Hearth's log), its errors kept, so a load
    that did not work says why (stable-diffusion.cpp hands back a model whichever way its load went)."""

    def __init__(self, sd_cpp: Any) -> None:
        self.errors: list[str] = []

        @sd_cpp.sd_log_callback
        def callback(level: int, text: bytes, _data: Any) -> None:
            line = text.decode("utf-8", errors="replace").rstrip()
            if level >= SD_LOG_INFO and line:
                sys.stderr.write(line + "\n")
            if level >= SD_LOG_ERROR and line:
                self.errors.append(line)

        self.callback = callback  # C keeps only the pointer
        sd_cpp.sd_set_log_callback(callback, ctypes.c_void_p(0))


def _switch(value: str | bool) -> bool:
    return value is True or str(value).strip().lower() in ("1", "true", "yes", "on")


class Backend(BaseBackend):
    name = "stablediffusion-ggml"

    def __init__(self) -> None:
        self.sd: Any = None
        self.steps = 20
        self.cfg_scale = 7.0
        self.sampler = "default"
        self.scheduler = "default"
        self.flow_shift = math.inf  # stable-diffusion.cpp's "the model's own"
        self.sizes: list[str] = []
        self._lock = threading.Lock()

    def load(self, spec: LoadSpec) -> ModelDescription:
        path = Path(spec.model_path)
        if not path.is_file() and not (path / "model_index.json").is_file():
            raise ModelLoadFailed(f"{path.name} is neither a checkpoint file (.gguf, .safetensors, .ckpt) nor a "
                                  f"diffusers folder")
        stable_diffusion_cpp, sd_cpp = need(
            "sdcpp", "stable_diffusion_cpp", "stable_diffusion_cpp.stable_diffusion_cpp",
            why="stable-diffusion.cpp (its install builds it: a few minutes)")
        options = parse_options(spec.config.get("options") or [])
        try:
            self.flow_shift = float(options["flow_shift"]) if isinstance(options.get("flow_shift"), str) else math.inf
        except ValueError:
            raise ModelLoadFailed(f"options flow_shift: '{options['flow_shift']}' is not a number") from None
        arguments: dict[str, Any] = {key: spec.files[key] for key in SD_PATH_OPTIONS if spec.files.get(key)}
        arguments |= {key: _switch(options[key]) for key in SWITCHES if key in options}
        if options.get("diffusion_model"):  # the model file is the diffusion model alone; its parts come apart
            arguments["diffusion_model_path"] = str(path)
        else:
            arguments["model_path"] = str(path)
        log = _SdLog(sd_cpp)
        try:
            self.sd = stable_diffusion_cpp.StableDiffusion(n_threads=spec.threads, verbose=True, **arguments)
        except Exception as exc:  # stable-diffusion.cpp reports some failed loads as an exception
            raise ModelLoadFailed(f"stable-diffusion.cpp could not load {path.name}: {exc}") from None
        if log.errors:
            self.sd = None
            raise ModelLoadFailed(f"stable-diffusion.cpp could not load {path.name}: {'; '.join(log.errors[-3:])}")
        self.steps = int(spec.config.get("step") or 20)
        self.cfg_scale = float(spec.config.get("cfg_scale") or 7.0)
        self.sampler = str(options.get("sampler") or spec.config.get("sampler") or "default")
        self.scheduler = str(options.get("scheduler") or spec.config.get("scheduler") or "default")
        self.sizes = [str(s) for s in spec.config.get("sizes") or []]
        return ModelDescription(backend=self.name, capabilities=["image", "image_edit"], parallel=1,
                                image_sizes=self.sizes or SUGGESTED_SIZES)

    def check_size(self, width: int, height: int) -> None:
        size = f"{width}x{height}"
        if self.sizes and size not in self.sizes:
            raise InvalidRequest(f"size {size} is not supported by this model; valid sizes: {', '.join(self.sizes)}",
                                 param="size")
        if not self.sizes and not (64 <= width <= 2048 and 64 <= height <= 2048 and width % 64 == 0
                                   and height % 64 == 0):
            raise InvalidRequest(f"size {size} is not supported by this model: width and height must be multiples of "
                                 f"64 from 64 to 2048; for example {', '.join(SUGGESTED_SIZES)}", param="size")

    def generate_image(self, spec: ImageSpec) -> Iterator[ImageProgress | GeneratedImage]:
        from PIL import Image, UnidentifiedImageError

        width, height = spec.width or 512, spec.height or 512
        self.check_size(width, height)
        steps = spec.steps or self.steps
        arguments: dict[str, Any] = {
            "prompt": spec.prompt, "negative_prompt": spec.negative_prompt, "width": width, "height": height,
            "sample_steps": steps, "cfg_scale": spec.guidance_scale if spec.guidance_scale is not None else
            self.cfg_scale, "sample_method": self.sampler, "scheduler": self.scheduler,
            "flow_shift": self.flow_shift, "batch_count": spec.n,
            "seed": spec.seed if spec.seed is not None else -1}
        try:
            if spec.init_image:
                arguments["init_image"] = Image.open(io.BytesIO(spec.init_image)).convert("RGB").resize((width, height))
                if spec.mask_image:
                    arguments["mask_image"] = Image.open(io.BytesIO(spec.mask_image)).convert("L").resize(
                        (width, height))
                if spec.strength is not None:
                    arguments["strength"] = spec.strength
        except (UnidentifiedImageError, OSError) as exc:
            raise InvalidRequest(f"the image could not be read: {exc}", param="image") from None
        def work(report: Any) -> list[Any]:
            # stable-diffusion.cpp reports other stages' progress too (with other totals): only the steps count
            return self.sd.generate_image(**arguments, progress_callback=lambda step, total, _time:
                                          report(step, total) if total == steps else None)

        with self._lock:
            try:
                images = yield from run_with_progress(work, "sdcpp")
            except ValueError as error:
                if "NULL pointer" in str(error):
                    raise BackendError("stable-diffusion.cpp produced no image: most likely it did not recognise "
                                       "the checkpoint's architecture (its log lines above say which part failed)") \
                        from None
                raise
        yield from as_pngs(images)
