"""edge-imagegen: text-to-image on small ARM64 boards with ONNX Runtime."""

__version__ = "0.1.0"
