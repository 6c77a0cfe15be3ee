"""Home Assistant MQTT discovery: the device and its entities, as Home Assistant's MQTT integration reads them.

With ``mqtt.homeassistant: true`` the MQTT front end publishes, retained, one config per entity on
``<discovery prefix>/<component>/<node id>/<object id>/config`` at every connect, and again when
Home Assistant announces itself (``online`` on ``<discovery prefix>/status``, its birth message),
since a Home Assistant that started after us, or lost its retained messages, would not know us.
An empty retained config removes an entity: ``edge-imagegen ha-remove`` or
``mqtt.homeassistant_remove: true`` publish those.

One device (identifiers, name, model, software version) with:

- ``text`` *Prompt*: its command topic ``<prefix>/prompt`` submits the text as a job (config defaults);
- ``image`` *Image*: ``<prefix>/image`` (retained PNG bytes of the last image, ``mqtt.publish_images``);
- ``sensor`` *State*, *Queue*, *Last job duration*, *Precision*: fields of the retained ``<prefix>/state``;
- ``button`` *Cancel*: ``running`` on ``<prefix>/cancel`` cancels the running job.

Every entity is available while ``<prefix>/status`` says ``online`` (the daemon's will says ``offline``).
"""

from __future__ import annotations

import threading
from typing import Any

import paho.mqtt.client as mqtt

from ..config import Config
from ..errors import EdgeError

TEXT_STATE_MAX = 255  # Home Assistant keeps at most 255 characters of an entity's state
CANCEL_PRESS = "running"  # the button's payload: cancel whatever job is running


def node_id(device_id: str) -> str:
    # discovery topic levels allow [a-zA-Z0-9_-]; device ids may also hold '.'
    return "edge_imagegen_" + device_id.replace(".", "_")


def status_topic(config: Config) -> str:
    """Where Home Assistant publishes its birth (``online``) and last will (``offline``)."""
    return f"{config.mqtt.discovery_prefix}/status"


def prompt_topic(prefix: str) -> str:
    return f"{prefix}/prompt"


def cancel_topic(prefix: str) -> str:
    return f"{prefix}/cancel"


def _entities(config: Config, prefix: str) -> dict[tuple[str, str], dict[str, Any]]:
    """(component, object id) -> the entity's own fields."""
    state = f"{prefix}/state"
    return {
        ("text", "prompt"): {"name": "Prompt", "icon": "mdi:image-edit", "command_topic": prompt_topic(prefix),
                             "min": 1, "max": min(config.limits.max_prompt_chars, TEXT_STATE_MAX),
                             "mode": "text", "retain": False, "qos": 1},
        ("image", "image"): {"name": "Image", "image_topic": f"{prefix}/image", "content_type": "image/png"},
        ("sensor", "state"): {"name": "State", "icon": "mdi:progress-clock", "state_topic": state,
                              "value_template": "{{ value_json.state }}", "json_attributes_topic": state},
        ("sensor", "queue"): {"name": "Queue", "icon": "mdi:tray-full", "state_topic": state,
                              "value_template": "{{ value_json.queue }}", "unit_of_measurement": "jobs",
                              "state_class": "measurement"},
        ("sensor", "last_duration"): {"name": "Last job duration", "state_topic": state,
                                      "value_template": "{{ value_json.last_job.seconds if value_json.last_job "
                                                        "else none }}",
                                      "device_class": "duration", "unit_of_measurement": "s",
                                      "state_class": "measurement"},
        ("sensor", "precision"): {"name": "Precision", "icon": "mdi:memory", "state_topic": state,
                                  "value_template": "{{ value_json.precision }}", "entity_category": "diagnostic"},
        ("button", "cancel"): {"name": "Cancel", "icon": "mdi:cancel", "command_topic": cancel_topic(prefix),
                               "payload_press": CANCEL_PRESS, "retain": False, "qos": 1},
    }


def config_topic(config: Config, device_id: str, component: str, object_id: str) -> str:
    return f"{config.mqtt.discovery_prefix}/{component}/{node_id(device_id)}/{object_id}/config"


def config_topics(config: Config, device_id: str) -> list[str]:
    """Every discovery topic of this device (what ``ha-remove`` empties)."""
    return [config_topic(config, device_id, c, o) for c, o in _entities(config, "-")]


def discovery(config: Config, device_id: str, prefix: str, model: str, version: str) -> list[tuple[str, dict[str, Any]]]:
    """(topic, payload) of every entity's discovery config."""
    node = node_id(device_id)
    device = {"identifiers": [node], "name": f"edge-imagegen {device_id}", "manufacturer": "edge-imagegen",
              "model": model, "sw_version": version}
    common = {"availability_topic": f"{prefix}/status", "payload_available": "online",
              "payload_not_available": "offline", "device": device,
              "origin": {"name": "edge-imagegen", "sw_version": version}}
    return [(config_topic(config, device_id, component, object_id),
             {**fields, "unique_id": f"{node}_{object_id}", **common})
            for (component, object_id), fields in _entities(config, prefix).items()]


def prompt_job(payload: bytes) -> dict[str, Any]:
    """The job a text entity's value asks for: the prompt alone, the rest from ``defaults``."""
    # Home Assistant sends the text as it is (UTF-8); the job validator judges what it says
    return {"prompt": payload.decode("utf-8", errors="replace").strip()}


def remove_discovery(client: mqtt.Client, config: Config, device_id: str, timeout: float = 10.0) -> list[str]:
    """Empty every discovery config of the device (retained), which removes it from Home Assistant.

    ``client``: unconnected, with the credentials of the ``mqtt`` section; connected, used, closed here.
    """
    m = config.mqtt
    connected, refused = threading.Event(), []

    def on_connect(client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            refused.append(str(reason_code))
        connected.set()

    client.on_connect = on_connect
    try:
        client.connect(m.host, m.port, m.keepalive)
    except OSError as exc:
        raise EdgeError(f"mqtt: cannot connect to {m.host}:{m.port} ({exc.strerror or exc})") from None
    client.loop_start()
    try:
        if not connected.wait(timeout) or refused:
            raise EdgeError(f"mqtt: the broker at {m.host}:{m.port} did not accept the connection "
                            f"({', '.join(refused) or 'no answer'})")
        topics = config_topics(config, device_id)
        for info in [client.publish(t, b"", qos=1, retain=True) for t in topics]:
            info.wait_for_publish(timeout)
        return topics
    finally:
        client.disconnect()
        client.loop_stop()
