"""The model side of the service: what the worker runs, and what it checks at submit time."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Callable, Protocol

from .jobs import Job, Step

if TYPE_CHECKING:
    from .pipeline import Pipeline, Result


class Runner(Protocol):
    """The model side of the service. :class:`PipelineRunner` in production; tests may stand in."""

    model: str
    precision: str
    provider: str

    def check(self, job: Job) -> None: ...  # raise ValidationError for what only the model knows

    def generate(self, job: Job, on_step: Callable[[Step], None], cancel: threading.Event) -> Result: ...


class PipelineRunner:
    """The resident :class:`~edge.pipeline.Pipeline`: loaded once, used for every job."""

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline
        self.model = pipeline.bundle.name
        self.precision = pipeline.precision
        self.provider = pipeline.provider

    def check(self, job: Job) -> None:
        self.pipeline.check(job)

    def generate(self, job: Job, on_step: Callable[[Step], None], cancel: threading.Event) -> Result:
        return self.pipeline.generate(job, on_step=on_step, cancel=cancel)
