"""Per-step previews: the bundle's tiny decoder where it has one, else a cheap latent -> RGB map.

A bundle whose decoder is a tiny one (an AutoencoderTiny, its own or ``model.decoder``) previews
with that decoder (:class:`DecoderPreview`): the preview looks like the image, at a few percent of
a full VAE decode's cost. Latents are average-pooled first so that the preview's longer side is
at most :data:`PREVIEW_SIDE` pixels, which bounds its time, memory and the bytes sent per step.

Otherwise each pixel of the preview is a linear map of the latent channels at that position,
``rgb = latents . W + b`` in the VAE's [-1, 1] output range, one pixel per latent (an eighth of
the image's side for SD-style VAEs). For SD 1.x/2.x latents the coefficients are the well-known
ones (AUTOMATIC1111's "Approx cheap"); a bundle may carry its own in ``vae_decoder/preview.json``
(``{"weights": [[r, g, b] per latent channel], "bias": [r, g, b]}``), as the embedded model does:
``tools/fit_preview.py`` fits them by least squares to its VAE decoder's outputs.

The latents are those the denoising loop passes in :class:`edge.jobs.Step`; a preview is only
made when someone watches (edge.comms.http), so the loop pays nothing otherwise.
"""

from __future__ import annotations

import io
import json
import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .bundle import Bundle
from .config import RuntimeOptions
from .errors import BundleError
from .providers import make_session

log = logging.getLogger(__name__)

PREVIEW_FILE = "preview.json"
PREVIEW_SIDE = 256  # pixels: the longest side of a tiny decoder's preview
# SD 1.x/2.x VAE latent channels -> RGB (as used by AUTOMATIC1111's cheap approximation)
SD1_WEIGHTS = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))


@dataclass(frozen=True)
class LatentPreview:
    weights: np.ndarray  # (latent channels, 3)
    bias: np.ndarray  # (3,)
    source: str  # where the coefficients came from, for the logs

    def rgb(self, latents: np.ndarray) -> np.ndarray:
        """(1, C, H, W) latents -> (H, W, 3) uint8."""
        sample = np.asarray(latents, dtype=np.float32)[0]
        pixels = np.tensordot(sample, self.weights, axes=([0], [0])) + self.bias  # (H, W, 3)
        return np.round(np.clip(pixels * 127.5 + 127.5, 0, 255)).astype(np.uint8)

    def png(self, latents: np.ndarray) -> bytes:
        return _png(self.rgb(latents))


class DecoderPreview:
    """Previews decoded by a tiny decoder; its session is made at the first preview (none if nobody
    watches) and may be used from several threads."""

    def __init__(self, bundle: Bundle, runtime: RuntimeOptions):
        decoder = bundle.components["vae_decoder"]
        self.path, self.runtime, self.source = decoder.path, runtime, str(decoder.folder)
        self.scaling, self.shift, self.scale = bundle.vae_scaling_factor, bundle.vae_shift_factor, bundle.vae_scale
        self._session = None
        self._lock = threading.Lock()

    def _session_now(self):
        with self._lock:
            if self._session is None:
                self._session = make_session(self.path, self.runtime, "vae_decoder")
        return self._session

    def rgb(self, latents: np.ndarray) -> np.ndarray:
        """(1, C, H, W) latents -> (h, w, 3) uint8, pooled to at most PREVIEW_SIDE pixels a side
        (unless the decoder was exported for one latent size only)."""
        session = self._session_now()
        port = session.get_inputs()[0]
        sample = np.asarray(latents, dtype=np.float32)
        _, c, h, w = sample.shape
        k = 1 if all(isinstance(d, int) for d in port.shape[2:]) else math.ceil(max(h, w) * self.scale / PREVIEW_SIDE)
        if k > 1:
            sample = sample[:, :, :h // k * k, :w // k * k].reshape(1, c, h // k, k, w // k, k).mean(axis=(3, 5))
        z = np.ascontiguousarray(sample / self.scaling + self.shift, dtype=np.float32)
        pixels = session.run(None, {port.name: z})[0][0]
        return np.round(np.clip(pixels / 2 + 0.5, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)

    def png(self, latents: np.ndarray) -> bytes:
        return _png(self.rgb(latents))


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


Preview = LatentPreview | DecoderPreview  # both: rgb(latents) -> uint8 HWC, png(latents), source


def make_preview(bundle: Bundle, latent_channels: int, runtime: RuntimeOptions,
                 mode: str = "auto") -> Preview | None:
    """The tiny decoder when the bundle decodes with one (and ``mode`` is auto, not linear), else
    :func:`load_preview` of its own vae_decoder/ (fitted coefficients map the UNet's latents,
    whichever decoder model.decoder picks)."""
    if bundle.tiny_decoder and mode == "auto":
        return DecoderPreview(bundle, runtime)
    return load_preview(bundle.root / "vae_decoder", latent_channels)


def load_preview(vae_dir: Path, latent_channels: int) -> LatentPreview | None:
    """The bundle's own coefficients, else SD 1.x's for 4-channel latents, else None (no previews)."""
    path = Path(vae_dir) / PREVIEW_FILE
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            weights = np.asarray(data["weights"], dtype=np.float32)
            bias = np.asarray(data.get("bias", [0.0, 0.0, 0.0]), dtype=np.float32)
        except (ValueError, KeyError, TypeError) as exc:
            raise BundleError(f"{path}: not a preview file ({exc}); expected weights and bias") from None
        if weights.shape != (latent_channels, 3) or bias.shape != (3,):
            raise BundleError(f"{path}: weights must be {latent_channels}x3 and bias 3 numbers, got "
                              f"{'x'.join(map(str, weights.shape))} and {bias.size}")
        return LatentPreview(weights, bias, str(path))
    if latent_channels == 4:
        return LatentPreview(np.asarray(SD1_WEIGHTS, dtype=np.float32), np.zeros(3, np.float32), "SD 1.x")
    log.info("no %s for %d latent channels: no per-step previews", path, latent_channels)
    return None
