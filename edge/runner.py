"""The model side of the service: what the worker runs, and what it checks at submit time."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Callable, Protocol

from .jobs import Job, Step
from .preview import Preview, make_preview

if TYPE_CHECKING:
    from .pipeline import Pipeline, Result


class Runner(Protocol):
    """The model side of the service. :class:`PipelineRunner` in production; tests may stand in."""

    model: str
    precision: str
    provider: str
    preview: Preview | None  # latents -> a cheap RGB image, for per-step previews
    size: tuple[int, int]  # the model's native width and height
    fixed_size: bool  # True: no other size is allowed
    model_kind: str  # "plain", "inpainting" or "instruct" (edge.editing.model_kind)

    def check(self, job: Job) -> None: ...  # raise ValidationError for what only the model knows

    def generate(self, job: Job, on_step: Callable[[Step], None], cancel: threading.Event,
                 finish: threading.Event | None = None) -> Result: ...  # finish: end early, keep the images


class PipelineRunner:
    """The resident :class:`~edge.pipeline.Pipeline`: loaded once, used for every job."""

    def __init__(self, pipeline: Pipeline, preview: str = "auto"):
        self.pipeline = pipeline
        self.model = pipeline.bundle.name
        self.precision = pipeline.precision
        self.provider = pipeline.provider
        self.size = pipeline.default_size()
        self.fixed_size = pipeline.fixed_size
        self.model_kind = pipeline.model_kind
        self.preview = make_preview(pipeline.bundle, pipeline.latent_channels, pipeline.runtime, preview)

    def check(self, job: Job) -> None:
        self.pipeline.check(job)

    def generate(self, job: Job, on_step: Callable[[Step], None], cancel: threading.Event,
                 finish: threading.Event | None = None) -> Result:
        return self.pipeline.generate(job, on_step=on_step, cancel=cancel, finish=finish)
