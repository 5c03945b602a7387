"""Image generation with stable-diffusion.cpp (LocalAI's `stablediffusion-ggml`): GGUF and safetensors checkpoints,
or a diffusers folder, through stable-diffusion-cpp-python.

Options from the model YAML: `step` (default steps), `cfg_scale`, `sampler` (stable-diffusion.cpp's sample method,
e.g. euler_a), `sizes` (the exact WxH sizes allowed; default: both sides multiples of 64 from 64 to 2048, as
stable-diffusion.cpp wants).
"""

from __future__ import annotations

import io
import logging
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
from hearth.errors import BackendError, InvalidRequest, ModelLoadFailed

log = logging.getLogger("hearth.runner.sdcpp")

SUGGESTED_SIZES = ["512x512", "256x256", "768x768", "1024x1024"]


class Backend(BaseBackend):
    name = "stablediffusion-ggml"

    def __init__(self) -> None:
        self.sd: Any = None
        self.steps = 20
        self.cfg_scale = 7.0
        self.sampler = "default"
        self.sizes: list[str] = []
        self._lock = threading.Lock()

    def load(self, spec: LoadSpec) -> ModelDescription:
        path = Path(spec.model_path)
        if not path.is_file() and not (path / "model_index.json").is_file():
            raise ModelLoadFailed(f"{path.name} is neither a checkpoint file (.gguf, .safetensors, .ckpt) nor a "
                                  f"diffusers folder")
        (stable_diffusion_cpp,) = need("sdcpp", "stable_diffusion_cpp",
                                       why="stable-diffusion.cpp (its install builds it: a few minutes)")
        try:
            # verbose: stable-diffusion.cpp's own log lines (which say why a checkpoint is not recognised) reach
            # the runner's output, and so Hearth's log.
            self.sd = stable_diffusion_cpp.StableDiffusion(model_path=str(path), n_threads=spec.threads, verbose=True)
        except Exception as exc:  # stable-diffusion.cpp reports a failed load as an exception
            raise ModelLoadFailed(f"stable-diffusion.cpp could not load {path.name}: {exc}") from None
        self.steps = int(spec.config.get("step") or 20)
        self.cfg_scale = float(spec.config.get("cfg_scale") or 7.0)
        self.sampler = str(spec.config.get("sampler") or "default")
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
            self.cfg_scale, "sample_method": self.sampler, "batch_count": spec.n,
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
            return self.sd.generate_image(**arguments, progress_callback=lambda step, total, _time: report(step, total))

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
