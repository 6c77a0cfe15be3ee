"""The front ends: one thin module per transport, each an adapter over :class:`edge.service.Service`.

A front end turns its transport's messages into :meth:`Service.submit_payload` / ``submit_data``,
``get``, ``cancel`` and ``status`` calls, and the service's job events (its ``events`` bus) into its
transport's messages, with the bodies :mod:`edge.jobs` builds. It validates nothing itself and
imports only downward (service, jobs, config), never the daemon or another front end.
"""

from __future__ import annotations

from typing import Protocol


class FrontEnd(Protocol):
    """What the daemon does with every front end: start, take a SIGHUP's rules, stop taking new
    work, close."""

    def start(self) -> None: ...

    def reconfigured(self) -> None:
        """The service's limits or defaults changed (a SIGHUP): republish what was derived from them."""

    def stop_accepting(self) -> None: ...

    def close(self) -> None: ...
