"""Input images of edit jobs: decoding and checking them, resizing to the model's size, masks.

Images arrive base64-encoded in the job JSON (PNG, JPEG or WebP; a ``data:image/...;base64,``
prefix as browsers write it is accepted). :func:`check_image` runs at submit time: a file that is
not an image, is truncated, is larger than ``limits.max_image_bytes`` or has more pixels than
``limits.max_image_pixels`` (checked from the header, before any pixel is decoded: Pillow's
decompression-bomb guard is turned into an error too) is refused with a ValidationError naming
the field.

Resize modes (``edge.jobs.RESIZE_MODES``) are AUTOMATIC1111's (modules/images.py ``resize_image``), Lanczos throughout:

    just_resize       stretch to width x height
    crop_and_resize   scale to cover, centre crop
    resize_and_fill   scale to fit, centre, fill the borders by stretching the image's edge rows/columns

Masks: white = repaint. A mask is converted to greyscale, resized to the init image if its size
differs (with a note), resized like the init image, then blurred (Gaussian, radius ``mask_blur``
pixels). The model sees the blurred mask binarised at 0.5, as diffusers' mask processor does; the
final image keeps the original pixels wherever the blurred mask is 0, as AUTOMATIC1111 composites
them back (:func:`composite`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter, UnidentifiedImageError

from .errors import ValidationError

FORMATS = ("PNG", "JPEG", "WEBP")
MIN_SIDE = 8  # pixels: one latent cell
LANCZOS = Image.Resampling.LANCZOS


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int


def b64decode(field: str, text: str) -> bytes:
    """The bytes of a base64 job field (standard alphabet, padding required)."""
    if not isinstance(text, str):
        raise ValidationError(field, f"must be a base64 string of a PNG, JPEG or WebP file, got {type(text).__name__}")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValidationError(field, f"is not valid base64 ({exc})") from None


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def open_image(field: str, data: bytes, limits: ImageLimits | None) -> Image.Image:
    """Decode and fully load an image file, or raise ValidationError naming ``field``.

    ``limits`` None: only Pillow's own decompression-bomb guard (for a job already checked at submit).
    """
    if limits is not None and len(data) > limits.max_bytes:
        raise ValidationError(field, f"is {len(data)} bytes, the limit is {limits.max_bytes} (limits.max_image_bytes)")
    if not data:
        raise ValidationError(field, "is empty; expected a PNG, JPEG or WebP file")
    with warnings.catch_warnings():
        # Pillow warns (and only errors at twice its limit) on decompression bombs: refuse them.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            if image.format not in FORMATS:
                raise ValidationError(field, f"is a {image.format} image; use PNG, JPEG or WebP")
            width, height = image.size
            if limits is not None and width * height > limits.max_pixels:
                raise ValidationError(field, f"is {width}x{height} pixels, more than limits.max_image_pixels "
                                      f"({limits.max_pixels})")
            if min(width, height) < MIN_SIDE:
                raise ValidationError(field, f"is {width}x{height} pixels; each side must be at least {MIN_SIDE}")
            image.load()
        except UnidentifiedImageError:
            raise ValidationError(field, "is not an image Pillow can read; expected a PNG, JPEG or WebP file") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ValidationError(field, f"refused as a decompression bomb ({exc})") from None
        except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt pixel data
            raise ValidationError(field, f"could not be decoded: {exc}") from None
    return image


def check_image(field: str, text: str, limits: ImageLimits) -> str:
    """Submit-time check of a base64 image field; returns the text unchanged."""
    open_image(field, b64decode(field, text), limits)
    return text


def resize(image: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    """AUTOMATIC1111's resize_image (modes 0, 1, 2 by name); keeps the image's mode."""
    if image.size == (width, height):
        return image.copy()
    if mode == "just_resize":
        return image.resize((width, height), LANCZOS)
    ratio, src_ratio = width / height, image.width / image.height
    if mode == "crop_and_resize":
        src_w = width if ratio > src_ratio else image.width * height // image.height
        src_h = height if ratio <= src_ratio else image.height * width // image.width
    elif mode == "resize_and_fill":
        src_w = width if ratio < src_ratio else image.width * height // image.height
        src_h = height if ratio >= src_ratio else image.height * width // image.width
    else:
        raise ValidationError("resize_mode", f"{mode!r} is not a resize mode (edge.jobs.RESIZE_MODES)")
    resized = image.resize((src_w, src_h), LANCZOS)
    out = Image.new(image.mode, (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if mode == "resize_and_fill":
        if ratio < src_ratio:  # bands above and below: the first and last row, stretched
            fill = height // 2 - src_h // 2
            if fill > 0:
                out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
                out.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)),
                          box=(0, fill + src_h))
        elif ratio > src_ratio:  # bands left and right: the first and last column, stretched
            fill = width // 2 - src_w // 2
            if fill > 0:
                out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
                out.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)),
                          box=(fill + src_w, 0))
    return out


def prepare_mask(mask: Image.Image, init_size: tuple[int, int], width: int, height: int, mode: str,
                 blur: int, notes: list[str]) -> Image.Image:
    """The greyscale mask at the job's size, blurred; ``notes`` gets what was changed."""
    if mask.mode != "L":
        notes.append(f"mask: converted from {mask.mode} to greyscale")
        mask = mask.convert("L")
    if mask.size != init_size:
        notes.append(f"mask: resized from {mask.size[0]}x{mask.size[1]} to the init image's "
                     f"{init_size[0]}x{init_size[1]}")
        mask = mask.resize(init_size, LANCZOS)
    mask = resize(mask, width, height, mode)
    return mask.filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else mask


def to_pixels(image: Image.Image) -> np.ndarray:
    """RGB image -> (1, 3, H, W) float32 in [-1, 1], as diffusers' VaeImageProcessor."""
    array = np.asarray(image.convert("RGB")).astype(np.float32) / 255.0
    return (2.0 * array - 1.0).transpose(2, 0, 1)[None]


def binary_mask(mask: Image.Image) -> np.ndarray:
    """(1, 1, H, W) float32: 1 where the mask is >= 0.5 (repaint), else 0 (diffusers' do_binarize)."""
    array = np.asarray(mask).astype(np.float32) / 255.0
    return (array >= 0.5).astype(np.float32)[None, None]


def composite(generated: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """Generated pixels where the (blurred) mask is white, the original where it is black, blended between."""
    return Image.composite(generated, original.convert("RGB"), mask)


def png_base64(image: Image.Image) -> str:
    """An image as an edit job's init_image field (calibration and profiling runs)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return b64encode(buf.getvalue())
