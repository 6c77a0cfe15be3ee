"""Per-step previews: a cheap latent -> RGB approximation instead of a VAE decode.

Each pixel of the preview is a linear map of the latent channels at that position,
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import BundleError

log = logging.getLogger(__name__)

PREVIEW_FILE = "preview.json"
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
        buf = io.BytesIO()
        Image.fromarray(self.rgb(latents), "RGB").save(buf, format="PNG", compress_level=1)
        return buf.getvalue()


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
