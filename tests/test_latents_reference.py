"""The initial latents of a seed are the same bit for bit on every machine (x86-64, arm64).

tests/fixtures/latents_sha256.json holds the sha256 of the raw float32 latents of the embedded
model for a few seeds, recorded on x86-64 by ``tests/arm64/repro.py fixture``; tests/arm64/run.sh
runs this suite on an emulated arm64 Debian, so both architectures check the same hashes.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from edge.pipeline import gaussian, make_rng

REFERENCE = json.loads((Path(__file__).parent / "fixtures" / "latents_sha256.json").read_text())["latents"]


@pytest.mark.parametrize("seed", sorted(REFERENCE, key=int))
def test_initial_latents_match_the_recorded_hash(seed):
    ref = REFERENCE[seed]
    latents = gaussian(make_rng(int(seed)), tuple(ref["shape"]))
    assert latents.dtype == np.float32 and latents.shape == tuple(ref["shape"])
    raw = np.ascontiguousarray(latents, dtype="<f4").tobytes()
    assert latents.ravel()[:4].tolist() == ref["first"]
    assert hashlib.sha256(raw).hexdigest() == ref["sha256"]


def test_reference_shape_is_the_embedded_models(pipeline):
    """The hashes cover the latents the embedded model actually draws (1, C, H/8, W/8)."""
    width, height = pipeline.default_size()
    scale = pipeline.bundle.vae_scale
    expected = [1, pipeline.latent_channels, height // scale, width // scale]
    assert all(ref["shape"] == expected for ref in REFERENCE.values())
