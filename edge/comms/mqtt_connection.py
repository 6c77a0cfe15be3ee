"""The MQTT connection's settings from the ``mqtt`` config section: topics, credentials, TLS.

Shared by the daemon's front end and the one-off clients of the CLI (``ha-remove``).
"""

from __future__ import annotations

import ssl
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from ..config import Config
from ..errors import ConfigError

PROTOCOLS = {"mqttv5": mqtt.MQTTv5, "mqttv311": mqtt.MQTTv311}

def topic_prefix(config: Config, device_id: str) -> str:
    return config.mqtt.topic_prefix or f"edge-imagegen/{device_id}"


def fleet_prefix(config: Config) -> str | None:
    if not config.mqtt.fleet_group:
        return None
    return config.mqtt.fleet_prefix or f"edge-imagegen/fleet/{config.mqtt.fleet_group}"


def read_password(config: Config) -> str | None:
    m = config.mqtt
    if m.password_file:
        try:
            lines = Path(m.password_file).expanduser().read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"mqtt.password_file: cannot read {m.password_file} ({exc.strerror})") from None
        return lines[0] if lines else ""
    return m.password


def authenticate(client: mqtt.Client, config: Config) -> None:
    """User name, password and TLS from the ``mqtt`` section (the daemon's client, ``ha-remove``'s)."""
    m = config.mqtt
    if m.username is not None:
        client.username_pw_set(m.username, read_password(config))
    if m.tls.enabled:
        client.tls_set(ca_certs=m.tls.ca, certfile=m.tls.cert, keyfile=m.tls.key,
                       cert_reqs=ssl.CERT_REQUIRED)
        client.tls_insecure_set(m.tls.insecure)


def one_off_client(config: Config, client_id: str) -> mqtt.Client:
    """An unconnected client with the ``mqtt`` section's protocol and credentials (e.g. ``ha-remove``)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=PROTOCOLS[config.mqtt.protocol])
    authenticate(client, config)
    return client
