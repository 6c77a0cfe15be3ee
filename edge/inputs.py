"""The input images of accepted edit jobs, kept in the state folder as long as their job is journaled.

Before an edit job is committed to the journal (and so before any front end acknowledges it), its
``init_image`` and ``mask`` are written to ``<state>/inputs/<sha256>`` (atomic write: temp file,
fsync, rename, fsync of the folder), and the journal's copy of the job names them
``"sha256:<hex>"``. The journal stays small, replies about the job do not carry megabytes, and a
job replayed after a crash or a power cut runs with its very input: the file is checked against
its name when read.

Files that no journaled job names are removed by the service's idle-time housekeeping, right after
the journal forgets old jobs; only files older than ``grace`` seconds, since a file is written
just before its job's commit and may belong to a job being submitted at that moment.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

from .errors import EdgeError
from .images import b64decode, b64encode
from .jobs import Job
from .output import atomic_write

log = logging.getLogger(__name__)

REF_PREFIX = "sha256:"
IMAGE_FIELDS = ("init_image", "mask")
GRACE_SECONDS = 3600.0


class InputStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def put(self, data: bytes) -> str:
        """Store ``data`` durably; returns its reference ``sha256:<hex>``."""
        digest = hashlib.sha256(data).hexdigest()
        path = self.root / digest
        if path.is_file():
            os.utime(path)  # content-addressed: already there; only the pruning grace starts again
        else:
            atomic_write(path, data)
        return REF_PREFIX + digest

    def get(self, ref: str) -> bytes:
        digest = ref[len(REF_PREFIX):]
        try:
            data = (self.root / digest).read_bytes()
        except OSError as exc:
            raise EdgeError(f"input image {ref}: cannot read {self.root / digest} ({exc.strerror})") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise EdgeError(f"input image {ref}: {self.root / digest} does not hold what was stored (damaged)")
        return data

    def store(self, job: Job) -> Job:
        """The job with its images stored and replaced by their references (for the journal)."""
        refs = {name: self.put(b64decode(name, value)) for name in IMAGE_FIELDS
                if (value := getattr(job, name)) is not None and not value.startswith(REF_PREFIX)}
        return replace(job, **refs) if refs else job

    def resolve(self, job: Job) -> Job:
        """The job with its references replaced by the images (base64) again (to run it)."""
        images = {name: b64encode(self.get(value)) for name in IMAGE_FIELDS
                  if (value := getattr(job, name)) is not None and value.startswith(REF_PREFIX)}
        return replace(job, **images) if images else job

    def prune(self, referenced: set[str], grace: float | None = None) -> int:
        """Remove stored files no reference in ``referenced`` names, if older than ``grace``
        (default GRACE_SECONDS); returns how many."""
        if not self.root.is_dir():
            return 0
        grace = GRACE_SECONDS if grace is None else grace
        keep = {ref[len(REF_PREFIX):] for ref in referenced}
        removed, now = 0, time.time()
        for path in self.root.iterdir():
            if path.name in keep or path.name.startswith("."):
                continue
            try:
                if now - path.stat().st_mtime >= grace:
                    path.unlink()
                    removed += 1
            except OSError as exc:
                log.warning("could not remove the input image %s: %s", path, exc.strerror)
        return removed


def references(job: Job) -> set[str]:
    return {value for name in IMAGE_FIELDS if (value := getattr(job, name)) and value.startswith(REF_PREFIX)}
