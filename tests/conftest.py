import shutil
from pathlib import Path

import pytest

from edge.bundle import EMBEDDED_MODEL, load_bundle
from edge.pipeline import Pipeline
from edge.providers import RuntimeOptions


@pytest.fixture(scope="session")
def pipeline() -> Pipeline:
    """The embedded model, loaded once: real ONNX Runtime sessions."""
    return Pipeline(load_bundle(), RuntimeOptions(threads=1))


# The random-weight SD bundle the model started with: the reference for the diffusers comparison
# (tools/check_optimum_bundle.py rebuilds its weights from seeds) and a CLIP-vocabulary bundle.
TINY_SD = Path(__file__).parent / "fixtures" / "tiny-sd"


@pytest.fixture(scope="session")
def tiny_sd_pipeline() -> Pipeline:
    return Pipeline(load_bundle(TINY_SD), RuntimeOptions(threads=1))


@pytest.fixture
def bundle_copy(tmp_path) -> Path:
    """A writable copy of the embedded bundle, to break or change."""
    dest = tmp_path / "bundle"
    shutil.copytree(EMBEDDED_MODEL, dest)
    return dest
