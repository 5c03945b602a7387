"""OpenAI's image API: /v1/images/generations, /v1/images/edits, /v1/images/variations, and the files behind
`url` results (/generated-images/<random id>.png, deleted after `generated_images_ttl_minutes`)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile

from hearth.api.openai.common import read_form, refuse_unknown
from hearth.api.routing import HearthRoute
from hearth.api.streaming import until_disconnect
from hearth.chat.images import check_image_async
from hearth.engine import Engine
from hearth.errors import InvalidRequest, NotFound
from hearth.runner import hearth_pb2 as pb

log = logging.getLogger("hearth.api")

SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")
FILE_NAME = re.compile(r"[0-9a-f]{32}\.png")
EDIT_FIELDS = {"image", "image[]", "mask", "prompt", "model", "n", "size", "response_format", "user", "seed", "steps",
               "step", "negative_prompt", "strength", "guidance_scale", "quality", "background", "input_fidelity",
               "output_format"}


class ImageRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field("stablediffusion", min_length=1)
    prompt: str
    negative_prompt: str | None = None
    n: int = Field(1, ge=1, le=10)
    size: str | None = None
    response_format: Literal["url", "b64_json"] = "url"
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    steps: int | None = Field(None, ge=1, le=500)
    step: int | None = Field(None, ge=1, le=500)  # LocalAI's name
    guidance_scale: float | None = Field(None, ge=0, le=50)
    quality: Literal["standard", "hd", "auto", "low", "medium", "high"] | None = None
    style: Literal["vivid", "natural"] | None = None
    user: str | None = None


def split_prompt(prompt: str, negative: str | None) -> tuple[str, str]:
    """LocalAI's `positive|negative` split; an explicit negative_prompt wins."""
    positive, _, rest = prompt.partition("|")
    if not positive.strip():
        raise InvalidRequest("prompt must not be empty", param="prompt")
    return positive.strip(), (negative if negative is not None else rest).strip()


def parse_size(size: str | None) -> tuple[int, int]:
    if size is None or size == "auto":
        return 0, 0
    match = SIZE.fullmatch(size.strip())
    if not match:
        raise InvalidRequest(f"size must look like 512x512 (WIDTHxHEIGHT), got '{size}'", param="size")
    return int(match.group(1)), int(match.group(2))


def image_dir(engine: Engine) -> Path:
    folder = engine.settings.cache_dir / "generated-images"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def remove_expired(engine: Engine) -> int:
    """Delete generated images older than the setting; returns how many went."""
    limit = time.time() - engine.settings.generated_images_ttl_minutes * 60
    removed = 0
    for path in image_dir(engine).glob("*.png"):
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_mtime < limit:
                path.unlink()
                removed += 1
    return removed


async def cleanup_loop(engine: Engine) -> None:
    """Runs for the server's lifetime: expired images are deleted every minute."""
    while True:
        with contextlib.suppress(OSError):
            await asyncio.to_thread(remove_expired, engine)
        await asyncio.sleep(60)


async def _generate(engine: Engine, request: Request, model: str, message: pb.ImageRequest,
                    response_format: str) -> dict[str, Any]:
    config = engine.model(model)
    capability = "image_edit" if message.init_image else "image"
    pngs: dict[int, bytes] = {}
    async with engine.runner(config, capability) as runner:
        async for reply in runner.stream("generate_image", message):
            if reply.png:
                pngs[reply.index] = reply.png
    data = []
    for index in sorted(pngs):
        png = pngs[index]
        if response_format == "b64_json":
            data.append({"b64_json": base64.b64encode(png).decode("ascii")})
        else:
            name = f"{secrets.token_hex(16)}.png"
            path = image_dir(engine) / name
            partial = path.with_name(f".{name}.partial")
            await asyncio.to_thread(partial.write_bytes, png)
            os.replace(partial, path)
            data.append({"url": f"{str(request.base_url).rstrip('/')}/generated-images/{name}"})
    return {"created": int(time.time()), "data": data}


async def generations(body: ImageRequest, request: Request) -> dict[str, Any]:
    refuse_unknown(body)
    engine: Engine = request.app.state.engine
    prompt, negative = split_prompt(body.prompt, body.negative_prompt)
    width, height = parse_size(body.size)
    message = pb.ImageRequest(prompt=prompt, negative_prompt=negative, width=width, height=height,
                              steps=body.steps or body.step or 0, n=body.n)
    if body.seed is not None:
        message.seed = body.seed
    if body.guidance_scale is not None:
        message.guidance_scale = body.guidance_scale
    return await _generate(engine, request, body.model, message, body.response_format)


async def _image_bytes(upload: Any, param: str) -> bytes:
    if not isinstance(upload, UploadFile):
        raise InvalidRequest(f"'{param}' must be an image file", param=param)
    data = await upload.read()
    if not data:
        raise InvalidRequest(f"'{param}' is empty", param=param)
    return await check_image_async(data, param)


def _mask_from(image: bytes, mask: bytes | None) -> bytes:
    """A white-means-repaint mask: OpenAI's masks (and an image's own alpha) mark with transparency."""
    import io

    from PIL import Image

    source = Image.open(io.BytesIO(mask if mask is not None else image))
    if source.mode not in ("RGBA", "LA") and not (source.mode == "P" and "transparency" in source.info):
        if mask is None:
            return b""  # no transparency and no mask: image to image
        grey = source.convert("L")  # an opaque mask: white already means repaint
    else:
        alpha = source.convert("RGBA").getchannel("A")
        grey = alpha.point(lambda a: 255 if a < 128 else 0)
    buffer = io.BytesIO()
    grey.save(buffer, format="PNG")
    return buffer.getvalue()


async def edits(request: Request, variation: bool) -> dict[str, Any]:
    engine: Engine = request.app.state.engine
    form = await read_form(request, EDIT_FIELDS, "an 'image'")
    fields = {key: value for key, value in form.items() if isinstance(value, str)}
    model = fields.get("model") or "stablediffusion"
    image = await _image_bytes(form.get("image") or form.get("image[]"), "image")
    if variation:
        config = engine.model(model)
        async with engine.runner(config, "image") as runner:
            has = list(runner.info.capabilities) if runner.info else []
        if "image_variation" not in has:
            raise InvalidRequest(f"model '{model}' cannot make variations of an image; use /v1/images/edits "
                                 f"with a prompt instead", param="model")
    prompt, negative = split_prompt(fields.get("prompt", ""), fields.get("negative_prompt"))
    mask_upload = form.get("mask")
    mask = await _image_bytes(mask_upload, "mask") if mask_upload is not None else None

    def number(name: str, kind: type, low: float, high: float) -> Any:
        if name not in fields or fields[name] == "":
            return None
        try:
            value = kind(fields[name])
        except ValueError:
            raise InvalidRequest(f"{name} must be a number", param=name) from None
        if not low <= value <= high:
            raise InvalidRequest(f"{name} must be between {low:g} and {high:g}", param=name)
        return value

    n = number("n", int, 1, 10) or 1
    width, height = parse_size(fields.get("size"))
    response_format = fields.get("response_format") or "url"
    if response_format not in ("url", "b64_json"):
        raise InvalidRequest("response_format must be 'url' or 'b64_json'", param="response_format")
    message = pb.ImageRequest(prompt=prompt, negative_prompt=negative, width=width, height=height, n=n,
                              steps=number("steps", int, 1, 500) or number("step", int, 1, 500) or 0,
                              init_image=image,
                              mask_image=await asyncio.to_thread(_mask_from, image, mask))
    for name, kind, low, high in (("seed", int, 0, 2**32 - 1), ("guidance_scale", float, 0, 50),
                                  ("strength", float, 0.01, 1)):
        value = number(name, kind, low, high)
        if value is not None:
            setattr(message, name, value)
    return await _generate(engine, request, model, message, response_format)


router = APIRouter(route_class=HearthRoute)


@router.post("/v1/images/generations")
@router.post("/images/generations", include_in_schema=False)
async def generations_route(body: ImageRequest, request: Request) -> Any:
    return await until_disconnect(request, generations(body, request))


@router.post("/v1/images/edits")
@router.post("/images/edits", include_in_schema=False)
async def edits_route(request: Request) -> Any:
    return await until_disconnect(request, edits(request, variation=False))


@router.post("/v1/images/variations")
@router.post("/images/variations", include_in_schema=False)
async def variations_route(request: Request) -> Any:
    return await until_disconnect(request, edits(request, variation=True))


@router.get("/generated-images/{name}")
async def generated_image(name: str, request: Request) -> Any:
    engine: Engine = request.app.state.engine
    if not FILE_NAME.fullmatch(name):
        raise NotFound("no such image")
    path = image_dir(engine) / name
    limit = time.time() - engine.settings.generated_images_ttl_minutes * 60
    try:
        expired = path.stat().st_mtime < limit
    except FileNotFoundError:
        raise NotFound("no such image (generated images are kept for a limited time)") from None
    if expired:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise NotFound("this image has expired (generated images are kept for a limited time)")
    return FileResponse(path, media_type="image/png")

