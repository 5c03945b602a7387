"""Image generation with diffusers on the CPU build of torch: any diffusers pipeline folder (SD 1.x/2.x, SDXL,
SD-Turbo, ...). Text to image; with an init image, image to image, and with a mask, inpainting (through the same
weights, `AutoPipelineFor...from_pipe`).

Options from the model YAML (LocalAI's names): `step` (default steps), `diffusers: {scheduler_type, cfg_scale}`
(scheduler: ddim, pndm, lms, euler, euler_a, heun, dpm_2m (k_dpmpp_2m), unipc), `sizes` (the exact WxH sizes
allowed; default: both sides multiples of 8 from 64 to 2048).
"""

from __future__ import annotations

import io
import logging
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hearth.backends.base import Backend as BaseBackend
from hearth.backends.base import LoadSpec, ModelDescription, need
from hearth.cores import Share, follow_in_torch
from hearth.errors import InvalidRequest, ModelLoadFailed

log = logging.getLogger("hearth.runner.diffusers")

SCHEDULERS = {
    "ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler", "k_lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler", "k_euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler", "k_euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler", "k_heun": "HeunDiscreteScheduler", "dpm_2m": "DPMSolverMultistepScheduler",
    "k_dpmpp_2m": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler",
}
SUGGESTED_SIZES = ["256x256", "512x512", "768x768", "1024x1024"]


@dataclass
class ImageSpec:
    prompt: str
    negative_prompt: str = ""
    width: int = 0
    height: int = 0
    steps: int = 0
    seed: int | None = None
    guidance_scale: float | None = None
    n: int = 1
    init_image: bytes = b""
    mask_image: bytes = b""
    strength: float | None = None


@dataclass
class ImageProgress:
    step: int
    total: int


@dataclass
class GeneratedImage:
    index: int
    png: bytes


class Backend(BaseBackend):
    name = "diffusers"

    def __init__(self) -> None:
        self.pipe: Any = None
        self.steps = 25
        self.guidance: float | None = None
        self.sizes: list[str] = []
        self.native = 512
        self._edit_pipes: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.share = Share(1)
        self.threads = 0  # torch threads of the last step, as the share set them

    def load(self, spec: LoadSpec) -> ModelDescription:
        path = Path(spec.model_path)
        diffusers, torch = need("images", "diffusers", "torch", why="the diffusers backend")
        torch.set_num_threads(spec.threads)
        self.share = spec.share()
        try:
            if path.is_dir():
                if not (path / "model_index.json").is_file():
                    raise ModelLoadFailed(f"{path.name} is not a diffusers pipeline folder (no model_index.json)")
                self.pipe = diffusers.DiffusionPipeline.from_pretrained(path, torch_dtype=torch.float32)
            else:
                self.pipe = diffusers.StableDiffusionPipeline.from_single_file(
                    str(path), torch_dtype=torch.float32, local_files_only=True)
        except ModelLoadFailed:
            raise
        except Exception as exc:  # diffusers raises many types for broken or incomplete models
            hint = (" (a single-file checkpoint needs its pipeline configuration, which cannot be fetched offline: "
                    "convert it to a diffusers folder, or use backend stablediffusion-ggml)") if path.is_file() else ""
            raise ModelLoadFailed(f"diffusers could not load {path.name}: {exc}{hint}") from None
        self.pipe.set_progress_bar_config(disable=True)
        options = spec.config.get("diffusers") or {}
        scheduler = options.get("scheduler_type")
        if scheduler:
            class_name = SCHEDULERS.get(str(scheduler).lower())
            if class_name is None:
                raise ModelLoadFailed(f"unknown diffusers.scheduler_type '{scheduler}'; known: "
                                      f"{', '.join(sorted(SCHEDULERS))}")
            self.pipe.scheduler = getattr(diffusers, class_name).from_config(self.pipe.scheduler.config)
        self.steps = int(spec.config.get("step") or options.get("steps") or 25)
        if options.get("cfg_scale") is not None:
            self.guidance = float(options["cfg_scale"])
        unet = getattr(self.pipe, "unet", None)
        factor = int(getattr(self.pipe, "vae_scale_factor", 8) or 8)
        sample = getattr(getattr(unet, "config", None), "sample_size", None)
        self.native = int(sample * factor) if isinstance(sample, int) else 512
        self.sizes = [str(s) for s in spec.config.get("sizes") or []]
        capabilities = ["image"]
        try:
            self._edit_pipe("image")
            capabilities.append("image_edit")
        except Exception as exc:  # a pipeline with no image-to-image variant
            log.info("no image-to-image pipeline for this model: %s", exc)
        sizes = self.sizes or [f"{self.native}x{self.native}", *[s for s in SUGGESTED_SIZES
                                                                 if s != f"{self.native}x{self.native}"]]
        return ModelDescription(backend=self.name, capabilities=capabilities, parallel=1, image_sizes=sizes,
                                architecture=type(self.pipe).__name__,
                                metadata={"scheduler": type(self.pipe.scheduler).__name__,
                                          "default_steps": str(self.steps)})

    def _edit_pipe(self, kind: str) -> Any:
        import diffusers

        if kind not in self._edit_pipes:
            factory = diffusers.AutoPipelineForInpainting if kind == "mask" else diffusers.AutoPipelineForImage2Image
            pipe = factory.from_pipe(self.pipe)
            pipe.set_progress_bar_config(disable=True)
            self._edit_pipes[kind] = pipe
        return self._edit_pipes[kind]

    def check_size(self, width: int, height: int) -> None:
        size = f"{width}x{height}"
        if self.sizes:
            if size not in self.sizes:
                raise InvalidRequest(f"size {size} is not supported by this model; valid sizes: {', '.join(self.sizes)}",
                                     param="size")
            return
        if not (64 <= width <= 2048 and 64 <= height <= 2048 and width % 8 == 0 and height % 8 == 0):
            raise InvalidRequest(f"size {size} is not supported by this model: width and height must be multiples of "
                                 f"8 from 64 to 2048; for example {', '.join(SUGGESTED_SIZES)} (native: "
                                 f"{self.native}x{self.native})", param="size")

    def generate_image(self, spec: ImageSpec) -> Iterator[ImageProgress | GeneratedImage]:
        import torch
        from PIL import Image, UnidentifiedImageError

        width, height = spec.width or self.native, spec.height or self.native
        self.check_size(width, height)
        steps = spec.steps or self.steps
        arguments: dict[str, Any] = {"prompt": spec.prompt, "num_inference_steps": steps,
                                     "num_images_per_prompt": spec.n}
        if spec.negative_prompt:
            arguments["negative_prompt"] = spec.negative_prompt
        guidance = spec.guidance_scale if spec.guidance_scale is not None else self.guidance
        if guidance is not None:
            arguments["guidance_scale"] = guidance
        pipe = self.pipe
        try:
            if spec.init_image:
                image = Image.open(io.BytesIO(spec.init_image)).convert("RGB").resize((width, height))
                arguments["image"] = image
                if spec.mask_image:
                    mask = Image.open(io.BytesIO(spec.mask_image)).convert("L").resize((width, height))
                    arguments.update(mask_image=mask, height=height, width=width)
                    pipe = self._edit_pipe("mask")
                else:
                    pipe = self._edit_pipe("image")
                if spec.strength is not None:
                    arguments["strength"] = spec.strength
            else:
                arguments.update(height=height, width=width)
        except (UnidentifiedImageError, OSError) as exc:
            raise InvalidRequest(f"the image could not be read: {exc}", param="image") from None
        except (ValueError, KeyError) as exc:
            raise InvalidRequest(f"this model cannot edit images: {exc}", param="image") from None
        if spec.seed is not None:
            arguments["generator"] = torch.Generator().manual_seed(spec.seed)
        total = max(1, int(steps * (spec.strength if spec.init_image and spec.strength is not None else 1)))

        def work(report: Callable[[int, int], None]) -> list[Any]:
            def on_step(_pipe: Any, step: int, _timestep: Any, state: dict) -> dict:
                report(step + 1, total)
                self.threads = follow_in_torch(self.share, torch)  # other models may have started or stopped
                return state

            self.threads = follow_in_torch(self.share, torch)
            with torch.inference_mode():
                return pipe(**arguments, callback_on_step_end=on_step).images

        with self._lock:
            started = time.perf_counter()
            try:
                images = yield from run_with_progress(work, "diffusers")
            except ValueError as error:
                raise InvalidRequest(f"the pipeline refused the request: {error}") from None
            log.info("%d image(s) of %dx%d in %d steps, %.2f s", spec.n, width, height, steps,
                     time.perf_counter() - started)
        yield from as_pngs(images)


def run_with_progress(work: Callable[[Callable[[int, int], None]], list[Any]],
                      name: str) -> Generator[ImageProgress, None, list[Any]]:
    """Run `work(report)` in a thread, yielding (and logging) each step it reports; returns its images."""
    events: queue.Queue = queue.Queue()
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["images"] = work(lambda step, total: events.put(ImageProgress(step=step, total=total)))
        except BaseException as exc:  # handed to the reader below
            result["error"] = exc
        events.put(None)

    threading.Thread(target=run, name=name, daemon=True).start()
    while (event := events.get()) is not None:
        log.info("step %d/%d", event.step, event.total)
        yield event
    if "error" in result:
        raise result["error"]
    return result["images"]


def as_pngs(images: list[Any]) -> Iterator[GeneratedImage]:
    for index, image in enumerate(images):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        yield GeneratedImage(index=index, png=buffer.getvalue())
