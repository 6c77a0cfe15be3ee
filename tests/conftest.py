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


@pytest.fixture
def bundle_copy(tmp_path) -> Path:
    """A writable copy of the embedded bundle, to break or change."""
    dest = tmp_path / "bundle"
    shutil.copytree(EMBEDDED_MODEL, dest)
    return dest
