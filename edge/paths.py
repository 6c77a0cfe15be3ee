"""Where the daemon keeps its state, its images and its socket, from the config and systemd's variables.

Shared by ``serve`` and its thin clients (``edge-imagegen submit``), so both find the same socket.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import Config

SOCKET_NAME = "edge-imagegen.sock"
SYSTEMD_SOCKET = Path("/run/edge-imagegen.sock")  # ListenStream= of systemd/edge-imagegen.socket


def state_dir(config: Config) -> Path:
    if config.daemon.state_dir:
        return Path(config.daemon.state_dir).expanduser()
    if os.environ.get("STATE_DIRECTORY"):  # systemd StateDirectory=; may list several, the first is ours
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "edge-imagegen"


def output_dir(config: Config, state: Path) -> Path:
    out = Path(config.output.dir).expanduser()
    return out if out.is_absolute() else state / out


def server_socket_path(config: Config) -> Path:
    """Where ``serve`` creates its socket when systemd did not pass one."""
    if config.socket.path:
        return Path(config.socket.path).expanduser()
    if os.environ.get("RUNTIME_DIRECTORY"):  # systemd RuntimeDirectory=
        return Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0]) / SOCKET_NAME
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / SOCKET_NAME
    return Path(f"/tmp/edge-imagegen-{os.getuid()}.sock")


def client_socket_path(config: Config) -> Path:
    """The first socket that exists: the configured one, the systemd units' ones, the user's own."""
    if config.socket.path:
        return Path(config.socket.path).expanduser()
    candidates = [SYSTEMD_SOCKET, Path("/run/edge-imagegen") / SOCKET_NAME, server_socket_path(config)]
    return next((p for p in candidates if p.exists()), candidates[-1])
