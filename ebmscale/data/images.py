"""PIL helpers shared by the shard writer, the training stream and evaluation: any mode to RGB/L, shorter side +
centre crop."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """RGB (channels=3) or L (channels=1) from any PIL mode; alpha is composited onto white, CMYK and palettes
    are converted by PIL."""
    if img.mode == "P" or "A" in img.mode:  # palette transparency, RGBA, LA, PA
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    return img.convert("L" if channels == 1 else "RGB")


def fit(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` (Lanczos down, bicubic up), then crop the centre size x size."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    s = size / min(w, h)
    rw, rh = max(size, round(w * s)), max(size, round(h * s))
    img = img.resize((rw, rh), Image.Resampling.LANCZOS if s < 1 else Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (rw - size) // 2, (rh - size) // 2
    return img.crop((left, top, left + size, top + size))


class ImageBomb(ValueError):
    pass


def open_for(src, size: int, max_pixels: int = 0) -> Image.Image:
    """Open a path / file object (JPEGs decoded at the smallest DCT scale still >= size) or wrap an array.
    ImageBomb if the header declares more than `max_pixels` (0: no cap), before anything is decoded."""
    if hasattr(src, "__array_interface__"):
        return Image.fromarray(src)
    img = Image.open(src)
    if max_pixels and img.width * img.height > max_pixels:
        raise ImageBomb(f"{img.width}x{img.height} pixels, more than data.max_image_pixels={max_pixels}")
    if img.format == "JPEG" and size:
        img.draft(None, (size, size))
    return img


def decode(data: bytes, size: int, channels: int, max_pixels: int = 0) -> np.ndarray:
    """Encoded image bytes -> uint8 [channels, size, size], fitted as the shard writer fits them."""
    img = fit(to_mode(open_for(io.BytesIO(data), size, max_pixels), channels), size)
    return np.asarray(img, dtype=np.uint8).reshape(size, size, channels).transpose(2, 0, 1)
