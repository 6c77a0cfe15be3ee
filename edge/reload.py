"""SIGHUP: re-read the config and take what can change without reloading the model.

What a reload takes: the content policy, the limits, the job defaults and the log level (the
``RELOADABLE`` sections). Everything else (the model, the runtime, MQTT, the socket, the folders)
needs a restart; a changed key there is logged, not applied. An invalid config changes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import fields
from typing import Callable

from .config import Config
from .errors import EdgeError
from .intake import Intake

log = logging.getLogger(__name__)

RELOADABLE = ("policy", "limits", "defaults", "log_level")


def reload(intake: Intake, load: Callable[[], Config]) -> list[str]:
    """Apply a fresh ``load()`` to ``intake``; returns the sections that changed and were applied."""
    try:
        new = load()
    except EdgeError as exc:
        log.error("reload: nothing reloaded, the config is not valid: %s", exc)
        return []
    old = intake.config
    changed = [name for name in RELOADABLE if getattr(new, name) != getattr(old, name)]
    restart = [f.name for f in fields(Config) if f.name not in RELOADABLE and not f.metadata.get("internal")
               and getattr(new, f.name) != getattr(old, f.name)]
    intake.reconfigure(new)
    if "log_level" in changed:  # unchanged: leave the level alone (serve -v keeps debug)
        logging.getLogger().setLevel(new.log_level.upper())
    if changed:
        log.info("reload: applied %s", ", ".join(changed))
    else:
        log.info("reload: the config has no change in %s; nothing to apply", ", ".join(RELOADABLE))
    if restart:
        log.warning("reload: %s changed; that takes effect only after a restart", ", ".join(restart))
    return changed
