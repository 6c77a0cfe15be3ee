"""Who is on the other end of a Unix socket connection (SO_PEERCRED), and whether they may submit.

The kernel fills in the peer's pid, uid and gid at connect time; they cannot be forged by the
client. The uid and gid are kept with every job submitted over the socket (the journal's ``peer``
column and the sidecar's ``submitted_by``). ``socket.allow_uids`` / ``socket.allow_groups``
narrow who may connect beyond the socket file's mode; both empty lets everyone in that the mode
lets in.
"""

from __future__ import annotations

import grp
import logging
import pwd
import socket
import struct

from .config import SocketConfig
from .errors import ConfigError

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_credentials(conn: socket.socket) -> dict[str, int]:
    """``{"pid", "uid", "gid"}`` of the process that connected."""
    pid, uid, gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return {"pid": pid, "uid": uid, "gid": gid}


class AllowList:
    """The ``socket.allow_uids`` / ``socket.allow_groups`` check; groups are looked up once, at start."""

    def __init__(self, config: SocketConfig):
        self.uids = set(config.allow_uids)
        self.gids: dict[int, str] = {}
        for name in config.allow_groups:
            try:
                self.gids[grp.getgrnam(name).gr_gid] = name
            except KeyError:
                raise ConfigError(f"socket.allow_groups: there is no group {name!r} on this system") from None

    @property
    def open(self) -> bool:
        return not self.uids and not self.gids

    def refusal(self, peer: dict[str, int]) -> str | None:
        """Why ``peer`` may not connect, or None when it may."""
        if self.open or peer["uid"] in self.uids or peer["gid"] in self.gids:
            return None
        try:
            user = pwd.getpwuid(peer["uid"]).pw_name
        except KeyError:
            user = None
        if user is not None and any(user in _members(gid) for gid in self.gids):
            return None
        return (f"permission: uid {peer['uid']} (gid {peer['gid']}) is not in socket.allow_uids and not a member "
                f"of socket.allow_groups")


def _members(gid: int) -> list[str]:
    try:
        return grp.getgrgid(gid).gr_mem
    except KeyError:  # the group went away since the start
        return []
