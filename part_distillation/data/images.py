"""The project's one image decoder: any file PIL reads becomes a uint8 RGB array.

Web-scraped trees such as ImageNet-21k hold grayscale, CMYK, 16-bit, palette and
transparent images, camera JPEGs with an EXIF rotation, truncated downloads, HTML pages
saved as ``.JPEG`` and the odd gigapixel scan. Every stage goes through ``load_rgb`` so
all of them see the same pixels, and a bad file becomes one exception type
(``BadImageError``) that a stage can count and skip instead of crashing a job.

Choices:
- Transparency is composited on white, not dropped: the colour under fully transparent
  pixels is arbitrary (often black), so dropping alpha shows garbage backgrounds.
- 16-bit samples are scaled to 8 bits over the full range (``v * 255 / 65535``).
- EXIF orientation is applied, so the array is the image as a viewer shows it.
- Size is checked from the header before any pixel is decoded; an image above
  ``max_pixels`` is downscaled (JPEGs decoded directly at 1/2, 1/4 or 1/8 scale) or
  refused. An image that would need more than ``max_decode_pixels`` pixels decoded
  even after that (a huge PNG cannot be decoded at reduced scale) is refused as well,
  so no file can exhaust memory.
- Memory bound: a large image (above ``STRIP_PIXELS``) is decoded once in the file's own
  mode, then converted to RGB and resized in horizontal strips written into the output
  array, so no full-size RGBA/RGB copy is ever made. Peak memory of one ``load_rgb`` is
  about the decoded image (``w * h`` x at most 4 bytes, 16-bit RGBA PNGs being decoded
  as 8-bit: at most ``4 * max_decode_pixels`` = 512 MiB at the defaults) plus the
  output (``3 * max_pixels`` bytes, 192 MiB) plus one strip (~64 MiB): under 0.8 GiB
  per decoding process at the defaults. A PNG above ``max_decode_pixels`` is refused
  even with ``oversize="downscale"`` (a PNG cannot be decoded at reduced scale);
  raise ``max_decode_pixels`` for such files, at 4 bytes per pixel of memory.
- A missing file raises ``FileNotFoundError`` (a wrong path, not a bad image).
- EPS is never opened: PIL would run Ghostscript on it.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

#: Default pixel budget (width x height) of a decoded image: 64 Mpx, far above any
#: ImageNet photo (the largest are ~10 Mpx) and ~200 MB as uint8 RGB.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024

#: In "downscale" mode a non-JPEG image is decoded in full before it is resized; one
#: needing more pixels decoded than this (128 Mpx, ~400 MB as RGB) is refused instead.
MAX_DECODE_PIXELS = 128 * 1024 * 1024

#: Above this many pixels an image is converted and resized in strips of about this
#: many source pixels (see the memory bound in the module notes).
STRIP_PIXELS = 4 * 1024 * 1024

Oversize = Literal["downscale", "refuse"]

_UNSAFE_FORMATS = {"EPS"}  # opening runs an external interpreter
_bomb_limit_lock = threading.Lock()


class BadImageError(Exception):
    """A file that cannot be decoded into an image (corrupt, truncated, not an image, too large)."""

    def __init__(self, path: PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keep it picklable across DataLoader workers
        return (type(self), (self.path, self.reason))


@dataclass(frozen=True)
class ImageInfo:
    """Result of ``probe_image``: the size ``load_rgb`` returns, or why it failed.

    ``width``/``height`` are 0 when the file could not be decoded.
    """

    width: int
    height: int
    ok: bool
    reason: str = ""


def load_rgb(path: PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS,
             oversize: Oversize = "downscale",
             max_decode_pixels: int = MAX_DECODE_PIXELS) -> np.ndarray:
    """Decode ``path`` to a uint8 array (H, W, 3), EXIF orientation applied.

    ``max_pixels`` bounds H*W of the result (``None``: no bound, PIL's own
    decompression-bomb limit then applies). Above it, ``oversize="downscale"`` shrinks
    the image keeping its aspect ratio, ``"refuse"`` raises ``BadImageError``.
    ``max_decode_pixels`` bounds the memory spent on the way (see the module notes).
    """
    if oversize not in ("downscale", "refuse"):
        raise ValueError(f"oversize must be 'downscale' or 'refuse', got {oversize!r}")
    if max_pixels is not None and max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if max_decode_pixels < 1:
        raise ValueError(f"max_decode_pixels must be positive, got {max_decode_pixels}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    if os.path.isdir(path):
        raise BadImageError(path, "is a directory")
    if os.path.getsize(path) == 0:
        raise BadImageError(path, "empty file (0 bytes)")
    try:
        with _open(path, max_pixels) as img:
            target = _fit_size(img.size, max_pixels)
            if target != img.size:
                if oversize == "refuse":
                    raise BadImageError(path, f"{img.size[0]}x{img.size[1]} image exceeds the limit of "
                                              f"{max_pixels} pixels (oversize='refuse')")
                if img.format in ("JPEG", "MPO"):
                    _draft_jpeg(img, target, max(max_decode_pixels, max_pixels))
                to_decode = img.size[0] * img.size[1]
                if to_decode > max(max_decode_pixels, max_pixels):
                    raise BadImageError(path, f"{img.size[0]}x{img.size[1]} {img.format} image would need "
                                              f"{to_decode} pixels decoded to downscale, more than "
                                              f"max_decode_pixels={max_decode_pixels}")
            img.load()
            if img.size[0] * img.size[1] > STRIP_PIXELS:
                array = _to_rgb_in_strips(img, _fit_size(img.size, max_pixels), path)
            else:
                img = _apply_exif_orientation(img, path)
                rgb = _to_rgb(img, path)
                out_size = _fit_size(rgb.size, max_pixels)
                if out_size != rgb.size:
                    rgb = rgb.resize(out_size, Image.Resampling.BILINEAR, reducing_gap=3.0)
                array = np.array(rgb, dtype=np.uint8)  # a writable copy, owned by the caller
    except (BadImageError, FileNotFoundError, MemoryError):
        raise
    except Exception as exc:  # any decoder failure is a property of the file, not of our code
        raise BadImageError(path, _describe(exc)) from exc
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise BadImageError(path, f"decoded to an unexpected array shape {array.shape}")
    return array


def probe_image(path: PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                oversize: Oversize = "downscale",
                max_decode_pixels: int = MAX_DECODE_PIXELS) -> ImageInfo:
    """Fully decode ``path`` as ``load_rgb`` would and report the size or the failure.

    Used to index a tree once, so later stages can skip bad files without retrying them.
    Decoding in full (not just reading the header) is what catches truncated files.
    """
    try:
        array = load_rgb(path, max_pixels=max_pixels, oversize=oversize, max_decode_pixels=max_decode_pixels)
    except (BadImageError, FileNotFoundError) as exc:
        reason = exc.reason if isinstance(exc, BadImageError) else f"file not found: {exc}"
        return ImageInfo(0, 0, False, reason)
    return ImageInfo(int(array.shape[1]), int(array.shape[0]), True, "")


# --------------------------------------------------------------------------- helpers

def _allowed_formats() -> list[str]:
    Image.init()
    return sorted(f for f in Image.OPEN if f not in _UNSAFE_FORMATS)


@contextmanager
def _open(path: str, max_pixels: int | None) -> Iterator[Image.Image]:
    """Open lazily (header only), with PIL's bomb check replaced by ours.

    PIL raises ``DecompressionBombError`` from the header alone above ~179 Mpx. When
    ``max_pixels`` is set we have our own bound, checked before decoding, so such a file
    is reopened with PIL's limit lifted (briefly, under a lock: it is a module global)
    and then downscaled or refused by ``load_rgb``.
    """
    formats = _allowed_formats()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        # PIL warns about palette transparency and odd EXIF; we handle both ourselves.
        warnings.simplefilter("ignore", UserWarning)
        try:
            img = Image.open(path, formats=formats)
        except Image.DecompressionBombError as exc:
            if max_pixels is None:
                raise BadImageError(path, f"refused as a decompression bomb: {exc}") from exc
            with _bomb_limit_lock:
                saved = Image.MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = None
                try:
                    img = Image.open(path, formats=formats)
                finally:
                    Image.MAX_IMAGE_PIXELS = saved
        except Image.UnidentifiedImageError as exc:
            raise BadImageError(path, "not an image file PIL can identify") from exc
        try:
            yield img
        finally:
            img.close()


def _fit_size(size: tuple[int, int], max_pixels: int | None) -> tuple[int, int]:
    """Largest (w, h) with the same aspect ratio and at most ``max_pixels`` pixels."""
    w, h = size
    if max_pixels is None or w * h <= max_pixels:
        return (w, h)
    scale = math.sqrt(max_pixels / (w * h))
    nw, nh = max(1, int(w * scale)), max(1, int(h * scale))
    while nw * nh > max_pixels:  # guard the rounding
        if nw >= nh:
            nw -= 1
        else:
            nh -= 1
    return (nw, nh)


def _draft_jpeg(img: Image.Image, target: tuple[int, int], decode_budget: int) -> None:
    """Have libjpeg decode at 1/2, 1/4 or 1/8 scale instead of in full.

    The scale is the strongest reduction that keeps the image at least ``target`` in
    size, or a stronger one where that would still decode more than ``decode_budget``
    pixels (the result is then smaller than the limit allows, but never refused).
    """
    w, h = img.size
    scales = (1, 2, 4, 8)
    keep_target = max(s for s in scales if w // s >= target[0] and h // s >= target[1])
    fits_budget = next((s for s in scales if -(-w // s) * -(-h // s) <= decode_budget), 8)
    scale = max(keep_target, fits_budget)
    if scale > 1:
        img.draft(None, (max(1, w // scale), max(1, h // scale)))


def _to_rgb_in_strips(img: Image.Image, out_size: tuple[int, int], path: str) -> np.ndarray:
    """``img`` (loaded, any mode) as uint8 RGB of ``out_size`` (H, W, 3), EXIF orientation applied.

    Converts and resizes horizontal strips of about ``STRIP_PIXELS`` source pixels. Each
    strip carries margin rows beyond the rows it maps to, and the resize box places it
    exactly, so the result equals one bilinear resize of the whole converted image. The
    orientation is applied to the (smaller) result. 32-bit and float gray images are
    scaled with the range of the whole image, not of each strip.
    """
    w, h = img.size
    out_w, out_h = out_size
    scale_y = h / out_h
    extrema = img.getextrema() if img.mode in ("I", "F") else None
    margin = int(math.ceil(scale_y)) + 2  # the bilinear filter's support, in source rows
    rows_out = max(1, int(max(1, STRIP_PIXELS // w) / scale_y))
    out = np.empty((out_h, out_w, 3), dtype=np.uint8)
    for top_out in range(0, out_h, rows_out):
        bottom_out = min(out_h, top_out + rows_out)
        if out_size == img.size:  # convert only
            out[top_out:bottom_out] = np.asarray(_to_rgb(img.crop((0, top_out, w, bottom_out)), path, extrema))
            continue
        y0, y1 = top_out * scale_y, bottom_out * scale_y
        top = max(0, int(math.floor(y0)) - margin)
        bottom = min(h, int(math.ceil(y1)) + margin)
        strip = _to_rgb(img.crop((0, top, w, bottom)), path, extrema)
        strip = strip.resize((out_w, bottom_out - top_out), Image.Resampling.BILINEAR,
                             box=(0, y0 - top, w, y1 - top))
        out[top_out:bottom_out] = np.asarray(strip)
    transpose = _exif_transpose_method(img, path)
    if transpose is None:
        return out
    return np.array(Image.fromarray(out).transpose(transpose), dtype=np.uint8)


def _exif_transpose_method(img: Image.Image, path: str):
    """The ``Image.Transpose`` that EXIF orientation asks for, or None."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception as exc:
        logger.warning("%s: ignoring unreadable EXIF orientation (%s)", path, _describe(exc))
        return None
    return {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}.get(orientation)


def _apply_exif_orientation(img: Image.Image, path: str) -> Image.Image:
    """Rotate/flip as the EXIF orientation says; a broken EXIF block is ignored, not fatal."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception as exc:
        logger.warning("%s: ignoring unreadable EXIF orientation (%s)", path, _describe(exc))
        return img


def _to_rgb(img: Image.Image, path: str, extrema: tuple | None = None) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (16-bit scaled, transparency on white).

    ``extrema``: (min, max) of the whole image when ``img`` is a strip of it.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(_gray_to_uint8(np.asarray(img), mode, extrema)).convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in ("PA", "LA", "La", "RGBA", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise BadImageError(path, f"cannot convert mode {mode!r} to RGB ({_describe(exc)})") from exc


def _gray_to_uint8(values: np.ndarray, mode: str, extrema: tuple | None = None) -> np.ndarray:
    """Scale 16-bit (or 32-bit int / float) gray samples to 0..255.

    ``I;16*`` is full-range 16-bit. Mode ``I`` is how older PIL versions return 16-bit
    PNG data, so values within 0..65535 are read as 16-bit too; anything else, and float
    images outside 0..1, are stretched from their own min..max.
    """
    values = values.astype(np.float64)
    if extrema is None and values.size:
        extrema = (values.min(), values.max())
    in_16bit_range = extrema is not None and extrema[0] >= 0 and extrema[1] <= 65535
    if mode.startswith("I;16") or (mode == "I" and in_16bit_range):
        scaled = values * (255.0 / 65535.0)
    else:
        lo, hi = (float(extrema[0]), float(extrema[1])) if extrema is not None else (0.0, 1.0)
        if mode == "F" and lo >= 0.0 and hi <= 1.0:
            lo, hi = 0.0, 1.0
        scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
