"""What the CLI shows on a terminal: the progress bar of ``generate`` and ``submit``."""

from __future__ import annotations

import sys
from typing import TextIO

from .jobs import Step


class ProgressBar:
    """A one-line bar on a terminal, plain lines otherwise (journald, pipes, CI logs)."""

    def __init__(self, stream: TextIO = sys.stderr):
        self.stream = stream
        self.tty = stream.isatty()

    def __call__(self, s: Step) -> None:
        label = f"image {s.image + 1}/{s.count} step {s.step}/{s.steps} ({s.seconds:.2f} s/step)"
        if self.tty:
            filled = int(30 * s.step / s.steps)
            end = "\n" if s.step == s.steps else ""
            self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {label}{end}")
        else:
            self.stream.write(label + "\n")
        self.stream.flush()
