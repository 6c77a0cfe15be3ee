"""Tiled VAE decoding: the latents decoded in overlapping tiles, blended with a cosine feather.

A VAE decoder's activations grow with the image: the SD decoder at 512x512 holds about 0.9 GB of
them (128-256 channels at full resolution), more than its weights, and in the int8-lowmem tier
it is the component that sets the peak. Decoding tiles of the latents one at a time bounds that
by the tile's size. Neighbouring tiles overlap by a quarter of a tile; in the overlap each tile's
weight falls from 1 to 0 along a half cosine (cos^2 + sin^2 = 1, so the weights still sum to
one) and the decoder's least reliable pixels, those next to a tile's edge, weigh least. Image
borders are not feathered. The SD decoder's group norms and mid-block attention see one tile at
a time, so a tiled image is close to the untiled one, not equal (PSNR figures in
benchmarks/README.md). Convolution-only decoders (AutoencoderTiny) have no such global terms:
their tiles differ from the whole only within their receptive field of a tile's edge.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

MIN_TILE = 8  # latent cells (64 px): smaller tiles are mostly overlap
# Peak activation bytes of a decode per output pixel and per channel of the decoder's
# full-resolution block (block_out_channels[0] = 128 for SD). Measured on the SD-1.5 VAE decoder
# (peak RSS less RSS after loading, benchmarks/README.md): 20.0 whole at 512 px, 21.4 in 256 px
# tiles, 25.0 in 128 px tiles (fixed costs weigh more in small tiles); rounded up so that a tile
# sized from the budget stays within it.
BYTES_PER_PIXEL_CHANNEL = 26


def decode_bytes(pixels: int, channels: int) -> int:
    """Estimated activation bytes of decoding ``pixels`` output pixels in one piece."""
    return pixels * channels * BYTES_PER_PIXEL_CHANNEL


def starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile offsets covering ``length`` with tiles of ``tile`` overlapping by at least ``overlap``,
    spread evenly so that every tile has the same size (static-shape decoders need that)."""
    if tile >= length:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def feather(length: int, ramp: int, start: bool, end: bool) -> np.ndarray:
    """One axis of a tile's weights: 1 inside, rising along a half cosine over ``ramp`` pixels at
    each side that meets another tile (``start``/``end``)."""
    x = np.arange(length, dtype=np.float64) + 0.5
    w = np.ones(length)
    if start:
        w = np.minimum(w, np.sin(np.minimum(x / ramp, 1.0) * np.pi / 2) ** 2)
    if end:
        w = np.minimum(w, np.sin(np.minimum((length - x) / ramp, 1.0) * np.pi / 2) ** 2)
    return w


def decode_tiled(decode: Callable[[np.ndarray], np.ndarray], latents: np.ndarray, tile: tuple[int, int],
                 scale: int) -> np.ndarray:
    """Decode (batch, channels, h, w) latents in ``tile`` (latent cells) pieces; ``decode`` maps
    latents to images ``scale`` times larger. Returns what one whole decode would (float32)."""
    _, _, h, w = latents.shape
    (th, tw), (oh, ow) = tile, (max(1, tile[0] // 4), max(1, tile[1] // 4))
    ys, xs = starts(h, th, oh), starts(w, tw, ow)
    out = weights = None
    for y in ys:
        for x in xs:
            piece = decode(np.ascontiguousarray(latents[:, :, y:y + th, x:x + tw]))
            if out is None:
                out = np.zeros(piece.shape[:2] + (h * scale, w * scale))
                weights = np.zeros((h * scale, w * scale))
            wy = feather(piece.shape[2], oh * scale, y > 0, y + th < h)
            wx = feather(piece.shape[3], ow * scale, x > 0, x + tw < w)
            mask = np.outer(wy, wx)
            region = (slice(y * scale, y * scale + piece.shape[2]), slice(x * scale, x * scale + piece.shape[3]))
            out[(..., *region)] += piece * mask
            weights[region] += mask
    log.debug("decoded %dx%d latents in %d tiles of %dx%d", h, w, len(ys) * len(xs), th, tw)
    return (out / weights).astype(np.float32)


def choose_tile(mode: str, tile_px: int, latent: tuple[int, int], static: tuple[int | None, int | None],
                scale: int, channels: int, lowmem: bool, budget: Callable[[], int]) -> tuple[int, int] | None:
    """The tile (latent cells) to decode ``latent`` with, or None for one whole decode.

    ``auto`` tiles in the int8-lowmem tier when the estimated decode does not fit ``budget()``
    (bytes free now, the decoder already loaded); ``on`` always tiles. The tile side is
    ``tile_px`` or, when 0, the largest whose decode fits the budget. A decoder exported with a
    static latent shape can only be fed that shape: it is the tile if it is smaller than the
    latents, otherwise the decode is whole.
    """
    if mode == "off":
        return None
    h, w = latent
    need = decode_bytes(h * w * scale * scale, channels)
    if mode == "auto" and not (lowmem and need > budget()):
        return None
    if static[0] and static[1]:
        if (static[0], static[1]) == (h, w) or static[0] > h or static[1] > w:
            log.info("VAE decode untiled: the decoder was exported with a fixed %dx%d latent shape",
                     static[0], static[1])
            return None
        return static[0], static[1]
    if tile_px:
        side = tile_px // scale
    else:
        room = budget()
        side = int(math.sqrt(room / (channels * BYTES_PER_PIXEL_CHANNEL))) // scale
        log.info("VAE decode in tiles of %d px: the whole decode needs about %d MB, %d MB are free",
                 side * scale, need >> 20, room >> 20)
    # The largest tile that fits: the overlap is a quarter of it, and wider overlaps blend
    # better (12- against 10-cell tiles of 16x16 latents: 35-40 against 28-35 dB).
    side = max(MIN_TILE, side)
    if side >= h and side >= w:
        return None
    return min(side, h), min(side, w)
