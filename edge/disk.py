"""Disk space for the daemon's images: a free-space floor, pruning by size and age, crash leftovers.

A kiosk's SD card fills up eventually. The daemon refuses to start a job below
``output.min_free_mb`` (the job fails with a ``disk:`` error, the daemon stays up), and after each
job deletes the oldest images beyond ``output.max_bytes`` or older than ``output.max_age_days``.
An image and its sidecar ``.json`` go together.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import OutputError

log = logging.getLogger(__name__)
MB = 1024 * 1024


def free_bytes(path: Path) -> int:
    """Free space for an unprivileged writer on the filesystem holding ``path`` (or its nearest parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def check_floor(path: Path, min_free_mb: int) -> None:
    """Raise OutputError when less than ``min_free_mb`` is free where ``path`` lives."""
    if min_free_mb <= 0:
        return
    free = free_bytes(path)
    if free < min_free_mb * MB:
        raise OutputError(f"disk: {free / MB:.0f} MB free in {path}, below the floor of {min_free_mb} MB "
                          f"(output.min_free_mb); the job was not started")


@dataclass(frozen=True)
class PruneReport:
    files: int = 0
    bytes: int = 0


def _image_sets(out_dir: Path) -> list[tuple[float, int, list[Path]]]:
    """(mtime, bytes, [png, sidecar]) for every image under out_dir."""
    sets = []
    for png in out_dir.glob("*/*.png"):
        try:
            st = png.stat()
        except FileNotFoundError:
            continue
        files, size = [png], st.st_size
        sidecar = png.with_suffix(".json")
        try:
            size += sidecar.stat().st_size
            files.append(sidecar)
        except FileNotFoundError:
            pass
        sets.append((st.st_mtime, size, files))
    sets.sort(key=lambda s: s[0])
    return sets


def prune(out_dir: Path, max_bytes: int = 0, max_age_days: float = 0.0,
          keep: frozenset[Path] | set[Path] = frozenset(), now: float | None = None) -> PruneReport:
    """Delete images older than ``max_age_days``, then the oldest until at most ``max_bytes`` remain.

    ``keep`` (the job just written) is never deleted, even when it alone exceeds ``max_bytes``.
    """
    out_dir = Path(out_dir)
    if (max_bytes <= 0 and max_age_days <= 0) or not out_dir.is_dir():
        return PruneReport()
    now = time.time() if now is None else now
    sets = _image_sets(out_dir)
    total = sum(size for _, size, _ in sets)
    removed = removed_bytes = 0
    for mtime, size, files in sets:
        too_old = max_age_days > 0 and now - mtime > max_age_days * 86400
        too_big = max_bytes > 0 and total > max_bytes
        if not (too_old or too_big) or files[0] in keep:
            continue
        for f in files:
            f.unlink(missing_ok=True)
        total -= size
        removed += 1
        removed_bytes += size
    for folder in out_dir.iterdir():  # date folders left empty
        if folder.is_dir():
            try:
                folder.rmdir()
            except OSError:
                pass
    if removed:
        log.info("pruned %d images (%.1f MB) from %s", removed, removed_bytes / MB, out_dir)
    return PruneReport(removed, removed_bytes)


def remove_temp_files(out_dir: Path) -> int:
    """Delete the temp files of writes a crash cut short (``.<name>.*.tmp``, see output.atomic_write).

    Only at start-up, when no write can be in progress.
    """
    count = 0
    out_dir = Path(out_dir)
    if out_dir.is_dir():
        for tmp in out_dir.glob("*/.*.tmp"):
            tmp.unlink(missing_ok=True)
            count += 1
    if count:
        log.info("removed %d unfinished temp files from %s", count, out_dir)
    return count


__all__ = ["check_floor", "free_bytes", "prune", "remove_temp_files", "PruneReport"]
