"""Images over MQTT: a finished job's PNGs as messages of their own, or inline in its result.

A remote client cannot open the paths a result names, so the bytes travel too:

- ``<prefix>/jobs/<id>/image/<k>`` (QoS ``mqtt.qos``, not retained): image *k*'s PNG bytes, also
  under the fleet prefix for a fleet job;
- ``<prefix>/image`` (retained): the last image of the last job, for dashboards (Home Assistant's
  ``image`` entity);
- ``"return": "base64"`` in the job: the PNGs inline in the result instead (one message).

One MQTT message may not exceed ``mqtt.max_image_bytes`` (set it to the broker's
``message_size_limit``: Mosquitto drops larger messages without telling the sender) nor the
Maximum Packet Size an MQTT 5 broker announces. An image over that is not sent; its entry in the
result's ``images`` says so, so the result itself always gets through.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..jobs import JobRecord

PACKET_OVERHEAD = 256  # a PUBLISH's fixed header, packet id and properties (correlation data), generously


@dataclass
class ImageMessages:
    """What to publish for one result, and what the result says about each image."""

    messages: list[tuple[str, bytes, bool]] = field(default_factory=list)  # topic, payload, retained
    entries: list[dict[str, Any]] = field(default_factory=list)


def message_limit(max_bytes: int, broker_max: int | None, topic: str) -> int:
    """The largest payload for ``topic``: the configured limit, or less if the broker allows less."""
    if broker_max is None:
        return max_bytes
    return min(max_bytes, broker_max - len(topic.encode()) - PACKET_OVERHEAD)


def _too_big(k: int, size: int, limit: int) -> dict[str, Any]:
    return {"index": k, "topic": None, "bytes": size,
            "note": f"image {k} is {size} bytes, over the {limit}-byte limit of one MQTT message "
                    f"(mqtt.max_image_bytes, or the broker's maximum packet size); not sent: it is "
                    f"paths[{k}] on the device"}


def image_messages(record: JobRecord, prefix: str, fleet: str | None, publish: bool, max_bytes: int,
                   broker_max: int | None, result_bytes: int, latest: bool) -> ImageMessages:
    """The image messages of a done job and the ``images`` entries of its result.

    ``publish``: ``mqtt.publish_images``; ``result_bytes``: the size of the result message without
    images (inline images must fit in it); ``latest``: also the retained ``<prefix>/image`` (a job
    that just finished, not a result asked for again).
    """
    out = ImageMessages()
    inline = record.job.return_ == "base64"
    if record.state != "done" or not (publish or inline):
        return out
    paths = (record.result or {}).get("paths", [])
    room = message_limit(max_bytes, broker_max, f"{prefix}/jobs/{record.id}/result") - result_bytes
    last: bytes | None = None
    for k, path in enumerate(paths):
        try:
            png = Path(path).read_bytes()
        except OSError:
            out.entries.append({"index": k, "topic": None,
                                "note": f"image {k} is no longer on the device (pruned or removed)"})
            continue
        if inline:
            encoded = base64.b64encode(png).decode("ascii")
            entry = {"index": k, "bytes": len(png), "base64": encoded}
            cost = len(json.dumps(entry)) + 2
            if cost > room:
                out.entries.append(_too_big(k, len(png), max(room, 0)))
            else:
                room -= cost
                out.entries.append(entry)
        else:
            topic = f"{prefix}/jobs/{record.id}/image/{k}"
            limit = message_limit(max_bytes, broker_max, topic)
            if len(png) > limit:
                out.entries.append(_too_big(k, len(png), limit))
                continue
            out.messages.append((topic, png, False))
            if fleet and record.reply.get("fleet"):
                out.messages.append((f"{fleet}/jobs/{record.id}/image/{k}", png, False))
            out.entries.append({"index": k, "topic": topic, "bytes": len(png)})
        if len(png) <= message_limit(max_bytes, broker_max, f"{prefix}/image"):
            last = png
    if publish and latest and last is not None:
        out.messages.append((f"{prefix}/image", last, True))
    return out
