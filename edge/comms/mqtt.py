"""The MQTT front end (paho-mqtt 2.x, ``CallbackAPIVersion.VERSION2``; MQTT 5 or 3.1.1).

Topics, with ``<prefix>`` = ``mqtt.topic_prefix`` (default ``edge-imagegen/<device id>``):

- ``<prefix>/jobs`` (subscribed, QoS ``mqtt.qos``): one job per message, the JSON job shape.
  With ``mqtt.fleet_group`` also ``$share/<group>/<fleet prefix>/jobs``: each message of the
  fleet topic goes to one device of the group.
- ``<prefix>/status`` (retained): ``online``, or ``offline`` (the last will, and a clean stop).
- ``<prefix>/state`` (retained JSON): state, queue depth, current job and its step, model, precision,
  provider, last job; published when a job starts or ends and, throttled like progress, per step.
- ``<prefix>/jobs/<id>/progress`` (QoS 0): ``{"id", "state": "queued"|"running", "image", "count",
  "step", "steps"}``, at most every ``mqtt.progress_interval`` s (the last step of an image always).
- ``<prefix>/jobs/<id>/result`` (QoS ``mqtt.qos``): ``{"status": "ok", "id", "paths", "seeds",
  "timings", ...}`` or ``{"status": "error", "id", "error", "field"?}``. A fleet job's messages
  also go to ``<fleet prefix>/jobs/<id>/...``.
- ``<prefix>/errors`` (QoS ``mqtt.qos``): errors for messages with no usable id (not JSON, ...).
- An MQTT 5 request with a ResponseTopic gets its result there too (one message, so that
  ``mosquitto_rr`` and other request/response clients get the result), with the request's
  CorrelationData.
- Images: :mod:`edge.comms.mqtt_images`; ``get``, history, cancel, plain-text prompts and Home
  Assistant's topics: :mod:`edge.comms.mqtt_requests`, :mod:`edge.comms.homeassistant`.

Nothing accepted is lost: the session is persistent (clean start off; with MQTT 5 a Session
Expiry Interval, without which the session would end with the connection) and messages are
acknowledged by hand (``manual_ack=True``) only once the job is committed to the journal or the
rejection has been answered. A message that arrives while the daemon stops is not acknowledged:
the broker delivers it again to the next run.

A message delivered again (DUP flag, after a reconnect) is recognised even without a job id: its
packet id and payload are stored with the job, so it is not queued twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import ssl
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from ..config import Config
from ..errors import ConfigError
from ..jobs import JobEvent, JobRecord, error_body, result_body
from .mqtt_images import image_messages
from .mqtt_requests import RequestTopics

if TYPE_CHECKING:
    from ..service import Answer, Service

log = logging.getLogger(__name__)

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


class MqttFrontEnd:
    def __init__(self, config: Config, service: Service):
        m = config.mqtt
        self.config, self.service = config, service
        self.v5 = m.protocol == "mqttv5"
        self.qos = m.qos
        self.prefix = topic_prefix(config, service.device_id)
        self.fleet = fleet_prefix(config)
        self.client_id = m.client_id or f"edge-imagegen-{service.device_id}"
        self.accepting = True
        self._first_connect = True
        self._lock = threading.Lock()
        self._last_progress: dict[str, float] = {}
        self._pending: list[tuple[mqtt.MQTTMessageInfo, str]] = []  # result publishes awaiting PUBACK
        self._state_dirty = threading.Event()
        self._closing = threading.Event()
        self._housekeeper: threading.Thread | None = None
        self._broker_max: int | None = None  # the Maximum Packet Size an MQTT 5 broker announced

        if self.v5:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5,
                                 manual_ack=True)
        else:  # 3.1.1 keeps the session with clean_session=False (it never expires on its own)
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv311,
                                 clean_session=False, manual_ack=True)
        authenticate(client, config)
        # the broker publishes this when the connection drops without a clean disconnect
        client.will_set(f"{self.prefix}/status", "offline", qos=1, retain=True)
        client.reconnect_delay_set(m.reconnect_min_delay, m.reconnect_max_delay)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_connect_fail = self._on_connect_fail
        client.on_subscribe = self._on_subscribe
        self.client = client
        self.requests = RequestTopics(self)
        self.requests.install(client)
        service.events.subscribe(self._on_event)

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        m = self.config.mqtt
        properties = None
        if self.v5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = m.session_expiry
        log.info("connecting to mqtt%s://%s:%d as %s, topics %s/...", "s" if m.tls.enabled else "", m.host, m.port,
                 self.client_id, self.prefix)
        # connect_async + loop_start: the network thread connects, and reconnects with back-off
        self.client.connect_async(m.host, m.port, m.keepalive, clean_start=False, properties=properties)
        self.client.loop_start()
        self._housekeeper = threading.Thread(target=self._housekeeping, name="mqtt-housekeeping", daemon=True)
        self._housekeeper.start()

    def stop_accepting(self) -> None:
        self.accepting = False

    def close(self, timeout: float = 5.0) -> None:
        """Publish offline (the will is not sent on a clean disconnect) and disconnect."""
        self._closing.set()
        if self._housekeeper is not None:
            self._housekeeper.join(timeout)
        if self.client.is_connected():
            state = {**self.service.status(), "state": "offline"}
            infos = [self.client.publish(f"{self.prefix}/state", json.dumps(state), qos=1, retain=True),
                     self.client.publish(f"{self.prefix}/status", "offline", qos=1, retain=True)]
            deadline = time.monotonic() + timeout
            for info in infos + [i for i, _ in self._pending]:
                try:
                    info.wait_for_publish(max(0.0, deadline - time.monotonic()))
                except (RuntimeError, ValueError):
                    pass
            self._check_pending()
        self.client.disconnect()
        self.client.loop_stop()

    # --- paho callbacks (the network thread) -------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            log.warning("the broker refused the connection: %s", reason_code)
            return
        log.info("connected to the broker (session present: %s)", flags.session_present)
        self._broker_max = getattr(properties, "MaximumPacketSize", None)
        topics = [f"{self.prefix}/jobs", *self.requests.topics()]
        if self.fleet:
            topics.append(f"$share/{self.config.mqtt.fleet_group}/{self.fleet}/jobs")
        if self.v5:  # a retained job would run again at every subscribe
            options = SubscribeOptions(qos=self.qos, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
            client.subscribe([(t, options) for t in topics])
        else:
            client.subscribe([(t, self.qos) for t in topics])
        # retained state again on every (re)connect: a broker that lost it (no persistence) or a
        # will published while we were away must not have the last word
        client.publish(f"{self.prefix}/status", "online", qos=1, retain=True)
        self.requests.on_connect()
        self._state_dirty.set()
        if self._first_connect:
            self._first_connect = False
            undelivered = self.service.undelivered("mqtt")
            if undelivered:
                log.info("publishing %d result(s) not confirmed delivered before the last stop", len(undelivered))
            for record in undelivered:
                self._publish_result(record)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: list, properties: Any) -> None:
        failed = [str(rc) for rc in reason_codes if rc.is_failure]
        if failed:  # e.g. an ACL that denies the jobs topic: jobs would never arrive
            log.error("the broker refused the job subscription: %s", ", ".join(failed))
        else:
            log.info("subscribed to the job topics")

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        log.warning("cannot reach the broker at %s:%d; retrying with back-off", self.config.mqtt.host,
                    self.config.mqtt.port)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if not self._closing.is_set():
            log.warning("disconnected from the broker (%s); reconnecting", reason_code)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if not self.accepting:
            return  # not acknowledged: the broker keeps it for the next run
        fleet = not message.topic.startswith(f"{self.prefix}/")
        reply: dict[str, Any] = {"fleet": fleet}
        props = message.properties
        if self.v5 and props is not None and getattr(props, "ResponseTopic", None):
            reply["response_topic"] = props.ResponseTopic
            correlation = getattr(props, "CorrelationData", None)
            if correlation is not None:
                reply["correlation"] = correlation.hex()
        if message.retain:
            self._answer(None, error_body("payload: a retained job message is refused (it would run again on "
                                          "every reconnect); publish jobs without the retain flag",
                                          None, "payload"), reply)
            client.ack(message.mid, message.qos)
            return
        # a redelivery carries the same packet id and payload
        dedup = hashlib.sha256(f"{message.topic}\0{message.mid}\0".encode() + message.payload).hexdigest()[:32]
        answer = self.service.submit_payload(message.payload, "mqtt", reply, dedup_key=dedup,
                                             redelivery=bool(message.dup))
        if answer.stopping:
            return  # not acknowledged, as above
        self._reply(answer, reply)
        client.ack(message.mid, message.qos)  # only now: the job is committed or the refusal answered

    # --- replies ------------------------------------------------------------------------------------
    def _reply(self, answer: Answer, reply: dict[str, Any]) -> None:
        record = answer.record
        if record is not None and record.finished_state:  # rejected now, or a duplicate of a finished job:
            self._publish_result(record)  # (again) the result, so that this sender has its answer
            return
        if record is not None:  # queued (new or duplicate): the first progress message says so
            self._publish_progress(record.id, answer.body, reply.get("fleet", False))
            return  # the response topic gets one message: the result
        self._answer(answer.job_id, answer.body, reply)

    def _answer(self, job_id: str | None, body: dict[str, Any], reply: dict[str, Any]) -> None:
        """An error reply to a message that did not become a job."""
        topic = f"{self.prefix}/jobs/{job_id}/result" if job_id else f"{self.prefix}/errors"
        self._publish(topic, body, self.qos)
        if reply.get("fleet") and self.fleet and job_id:
            self._publish(f"{self.fleet}/jobs/{job_id}/result", body, self.qos)
        if reply.get("response_topic"):
            self._publish(reply["response_topic"], body, self.qos, reply)

    def _publish(self, topic: str, body: dict[str, Any], qos: int, reply: dict[str, Any] | None = None,
                 retain: bool = False) -> mqtt.MQTTMessageInfo:
        properties = None
        if self.v5 and reply and reply.get("correlation") is not None:
            properties = Properties(PacketTypes.PUBLISH)
            properties.CorrelationData = bytes.fromhex(reply["correlation"])
        return self.client.publish(topic, json.dumps(body), qos=qos, retain=retain, properties=properties)

    def _result_with_images(self, record: JobRecord, latest: bool = False) -> dict[str, Any]:
        """The result body, its images published (or inlined) first; ``latest``: also ``<prefix>/image``."""
        body = result_body(record)
        m = self.config.mqtt
        images = image_messages(record, self.prefix, self.fleet, m.publish_images, m.max_image_bytes, self._broker_max,
                                len(json.dumps(body)), latest)
        for topic, payload, retain in images.messages:
            self.client.publish(topic, payload, qos=1 if retain else self.qos, retain=retain)
        if images.entries:
            body["images"] = images.entries
        return body

    def _publish_result(self, record: JobRecord, fresh: bool = False) -> None:
        body = self._result_with_images(record, latest=fresh)
        reply = record.reply
        infos = [self._publish(f"{self.prefix}/jobs/{record.id}/result", body, self.qos)]
        if reply.get("fleet") and self.fleet:
            infos.append(self._publish(f"{self.fleet}/jobs/{record.id}/result", body, self.qos))
        if reply.get("response_topic"):
            infos.append(self._publish(reply["response_topic"], body, self.qos, reply))
        if record.source == "mqtt":  # delivered once the broker acknowledged the result topic's copy
            with self._lock:
                self._pending.append((infos[0], record.id))

    def _publish_progress(self, job_id: str, body: dict[str, Any], fleet: bool) -> None:
        self._publish(f"{self.prefix}/jobs/{job_id}/progress", body, 0)
        if fleet and self.fleet:
            self._publish(f"{self.fleet}/jobs/{job_id}/progress", body, 0)

    # --- service events (the worker thread) ----------------------------------------------------------
    def _on_event(self, event: JobEvent) -> None:
        record = event.record
        fleet = bool(record.reply.get("fleet"))
        if event.kind == "started":
            self._last_progress[record.id] = 0.0
            self._publish_progress(record.id, event.body(), fleet)
        elif event.kind == "progress" and event.step is not None:
            step, now = event.step, time.monotonic()
            last_of_image = step.step == step.steps
            if last_of_image or now - self._last_progress.get(record.id, 0.0) >= self.config.mqtt.progress_interval:
                self._last_progress[record.id] = now
                self._publish_progress(record.id, event.body(), fleet)
                self._state_dirty.set()  # the retained state's step, as throttled as the progress
            return
        elif event.kind == "finished":
            self._last_progress.pop(record.id, None)
            self._publish_result(record, fresh=True)
        self._state_dirty.set()

    # --- state and delivery bookkeeping ------------------------------------------------------------
    def _housekeeping(self) -> None:
        """Publish the retained state when it changed (coalesced: a burst of submissions is one
        message) and record which results the broker acknowledged."""
        interval = max(self.config.mqtt.progress_interval, 0.2)
        while not self._closing.is_set():
            if self._state_dirty.wait(interval):
                if self._closing.is_set():
                    break
                self._state_dirty.clear()
                if self.client.is_connected():
                    self.client.publish(f"{self.prefix}/state", json.dumps(self.service.status()), qos=1, retain=True)
                else:
                    self._state_dirty.set()  # again after the reconnect
                self._closing.wait(interval)
            self._check_pending()

    def _check_pending(self) -> None:
        with self._lock:
            done = [(info, job_id) for info, job_id in self._pending if info.is_published()]
            self._pending = [(info, job_id) for info, job_id in self._pending if not info.is_published()]
        for job_id in {job_id for _, job_id in done}:
            self.service.mark_delivered(job_id)
