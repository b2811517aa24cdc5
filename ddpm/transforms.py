"""One encoded image -> one uint8 (C, H, W) array at the prepared resolution.

Steps, in order: decode (JPEG draft mode when the image is much larger than
needed), EXIF orientation, 16-bit -> 8-bit, transparency composited onto the
background colour, conversion to grey (L) or RGB, then fit to a square:
``crop`` resizes the shorter side to the resolution and crops the centre,
``pad`` resizes the longer side and pads with the background colour.

Random flips are a training-time augmentation (``train.hflip``), never baked
into prepared data. This module imports only numpy and PIL, so decoding
processes start fast.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Modes without colour: auto channels gives 1 when every image has one of these.
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_SIXTEEN_BIT = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})

# What a broken file raises inside PIL: unreadable, truncated, or a decompression bomb.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)

Payload = str | bytes  # a file path, or the encoded bytes of one image


@dataclass(frozen=True)
class Spec:
    """What every prepared image becomes."""

    resolution: int
    channels: int  # 1 or 3
    fit: str = "crop"  # crop | pad
    background: tuple[int, int, int] = (255, 255, 255)


@dataclass(frozen=True)
class Result:
    image: np.ndarray | None  # uint8 (C, H, W); None when the input could not be decoded
    error: str | None = None
    upscaled: bool = False


def open_image(payload: Payload) -> Image.Image:
    """Open (lazily: header only) an image from a path or bytes."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(payload))
    return Image.open(Path(payload))


def probe_mode(payload: Payload) -> str | None:
    """The image's mode from its header (no decoding); None if unreadable."""
    try:
        with open_image(payload) as img:
            return img.mode
    except DECODE_ERRORS:
        return None


def to_8bit_mode(img: Image.Image, channels: int, background: tuple[int, int, int]) -> Image.Image:
    """Any PIL mode -> ``L`` (channels 1) or ``RGB`` (channels 3).

    16-bit grey (``I;16*``, and ``I``, read as 16-bit) is scaled by 255/65535 and
    rounded; ``F`` is taken as already in [0, 255]. Transparent pixels (alpha, or a
    palette with a transparent entry) are composited onto ``background``.
    """
    if img.mode in _SIXTEEN_BIT:
        a = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        img = Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8), "L")
    elif img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in _ALPHA:
        canvas = Image.new("RGBA", img.size, (*background, 255))
        img = Image.alpha_composite(canvas, img.convert("RGBA")).convert("RGB")
    target = "L" if channels == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


def fit_square(img: Image.Image, resolution: int, fit: str = "crop",
               background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """An L or RGB image -> ``resolution`` x ``resolution``, bicubic (antialiased when shrinking)."""
    w, h = img.size
    if (w, h) == (resolution, resolution):
        return img
    if fit == "crop":
        scale = resolution / min(w, h)
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        return img.crop((left, top, left + resolution, top + resolution))
    if fit == "pad":
        scale = resolution / max(w, h)
        nw, nh = max(1, min(resolution, round(w * scale))), max(1, min(resolution, round(h * scale)))
        fill = background if img.mode == "RGB" else Image.new("RGB", (1, 1), background).convert("L").getpixel((0, 0))
        canvas = Image.new(img.mode, (resolution, resolution), fill)
        canvas.paste(img.resize((nw, nh), Image.BICUBIC), ((resolution - nw) // 2, (resolution - nh) // 2))
        return canvas
    raise ValueError(f"fit={fit!r} is not valid; choose one of crop, pad")


def resize_square(image: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 (H, W) or (H, W, C) -> (resolution, resolution[, C]): shorter side resized, centre crop."""
    return np.asarray(fit_square(Image.fromarray(image), resolution, "crop"))


def is_upscaled(size: tuple[int, int], resolution: int, fit: str) -> bool:
    """Whether fitting an image of ``size`` (w, h) to the resolution enlarges it."""
    return (min(size) if fit == "crop" else max(size)) < resolution


def prepare_image(payload: Payload, spec: Spec) -> Result:
    """Decode and transform one image; a file PIL cannot read gives ``Result(None, error)``."""
    try:
        with open_image(payload) as img:
            if img.format == "JPEG":
                # DCT scaling: decode at 1/2, 1/4 or 1/8 size, never below the resolution.
                img.draft(img.mode, (spec.resolution, spec.resolution))
            img.load()
            try:
                img = ImageOps.exif_transpose(img)
            except DECODE_ERRORS:  # a damaged EXIF block: keep the pixels as stored
                pass
            upscaled = is_upscaled(img.size, spec.resolution, spec.fit)
            img = fit_square(to_8bit_mode(img, spec.channels, spec.background), spec.resolution, spec.fit,
                             spec.background)
    except DECODE_ERRORS as exc:
        return Result(None, f"{type(exc).__name__}: {exc}")
    array = np.asarray(img, dtype=np.uint8)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)  # (C, H, W)
    return Result(np.ascontiguousarray(array), None, upscaled)
