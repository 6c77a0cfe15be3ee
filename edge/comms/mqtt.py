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
- Images: :mod:`edge.comms.mqtt_images`; ``get``, history, cancel, plain text, Home Assistant:
  :mod:`edge.comms.mqtt_requests`, :mod:`edge.comms.homeassistant`; settings: :mod:`edge.comms.mqtt_connection`.

Nothing accepted is lost: the session is persistent (clean start off; with MQTT 5 a Session
Expiry Interval, without which the session would end with the connection) and messages are
acknowledged by hand (``manual_ack=True``) only once the job is committed to the journal or the
rejection has been answered. A message that arrives while the daemon stops is not acknowledged:
the broker delivers it again to the next run.

A message delivered again (DUP flag, after a reconnect) is recognised even without a job id: its
packet id and payload are stored with the job, so it is not queued twice.

Every message is answered (callbacks are total, :mod:`edge.mqtt_guard`); a ResponseTopic that cannot
be published to is refused before anything is stored; an unexpected failure is answered on
``<prefix>/errors``, logged and acknowledged once. A message the journal cannot take (disk full) is
answered ``busy``, left unacknowledged and offered again every ``RETRY_INTERVAL`` s until taken.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import threading
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from ..config import Config
from ..jobs import JobEvent, JobRecord, error_body, result_body
from ..mqtt_guard import Deliveries, restart_network, topic_problem, total, watch_network
from .mqtt_connection import authenticate, fleet_prefix, topic_prefix
from .mqtt_images import image_messages
from .mqtt_requests import RequestTopics

if TYPE_CHECKING:
    from ..intake import Answer
    from ..service import Service

log = logging.getLogger(__name__)

RETRY_INTERVAL = 2.0  # seconds between offers of a message the journal could not take


class MqttFrontEnd:
    def __init__(self, config: Config, service: Service):
        m = config.mqtt
        self.service = service
        self.v5 = m.protocol == "mqttv5"
        self.qos = m.qos
        self.prefix = topic_prefix(config, service.device_id)
        self.fleet = fleet_prefix(config)
        self.client_id = m.client_id or f"edge-imagegen-{service.device_id}"
        self.accepting = True
        self._first_connect = True
        self._lock = threading.Lock()  # _held and _also_reply; never held while calling paho
        self._last_progress: dict[str, float] = {}
        self._deliveries = Deliveries(service.mark_delivered)
        self._held: list[tuple[mqtt.MQTTMessage, dict[str, Any]]] = []  # the journal could not take them
        self._also_reply: dict[str, list[dict[str, Any]]] = {}  # job id -> replies of later duplicates
        self._state_dirty = threading.Event()
        self._closing = threading.Event()
        self._housekeeper: threading.Thread | None = None
        self._network: threading.Thread | None = None
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
        client.on_publish = total(self._deliveries.on_publish)
        self.client = client
        self.requests = RequestTopics(self)
        self.requests.install(client)
        self.reconfigured = self.requests.reconfigured  # FrontEnd's: Home Assistant discovery again
        service.events.subscribe(self._on_event)
        service.supervisor.on_change(self._state_dirty.set)

    @property
    def config(self) -> Config:  # the service's: a SIGHUP's limits apply at once
        return self.service.config

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
        supervisor = self.service.supervisor
        self._network = supervisor.spawn("mqtt-network", lambda: watch_network(self.client, self._closing),
                                         self._closing, lambda: restart_network(self.client))
        self._housekeeper = supervisor.spawn("mqtt-housekeeping", self._housekeeping, self._closing)

    def stop_accepting(self) -> None:
        self.accepting = False

    def close(self, timeout: float = 5.0) -> None:
        """Publish offline (the will is not sent on a clean disconnect) and disconnect."""
        self._closing.set()
        for thread in (self._housekeeper, self._network):
            if thread is not None:
                thread.join(timeout)
        if self.client.is_connected():
            state = {**self.service.status(), "state": "offline"}
            infos = [self.client.publish(f"{self.prefix}/state", json.dumps(state), qos=1, retain=True),
                     self.client.publish(f"{self.prefix}/status", "offline", qos=1, retain=True)]
            deadline = time.monotonic() + timeout
            for info in infos:
                try:
                    info.wait_for_publish(max(0.0, deadline - time.monotonic()))
                except (RuntimeError, ValueError):
                    pass
            self._deliveries.wait(deadline)
        self._deliveries.record()
        self.client.disconnect()
        self.client.loop_stop()

    # --- paho callbacks (the network thread) -------------------------------------------------------
    @total
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            log.warning("the broker refused the connection: %s", reason_code)
            return
        log.info("connected to the broker (session present: %s)", flags.session_present)
        if self.config.mqtt.tcp_nodelay:  # small packets (PUBACK, progress) go out at once, not after Nagle's wait
            sock = client.socket()
            if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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

    @total
    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: list, properties: Any) -> None:
        failed = [str(rc) for rc in reason_codes if rc.is_failure]
        if failed:  # e.g. an ACL that denies the jobs topic: jobs would never arrive
            log.error("the broker refused the job subscription: %s", ", ".join(failed))
        else:
            log.info("subscribed to the job topics")

    @total
    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        log.warning("cannot reach the broker at %s:%d; retrying with back-off", self.config.mqtt.host,
                    self.config.mqtt.port)

    @total
    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if not self._closing.is_set():
            log.warning("disconnected from the broker (%s); reconnecting", reason_code)

    @total
    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if not self.accepting:
            return  # not acknowledged: the broker keeps it for the next run
        reply: dict[str, Any] = {}
        try:
            reply = self._reply_of(message)
            problem = topic_problem(reply["response_topic"]) if "response_topic" in reply else None
            if problem is not None:
                del reply["response_topic"]  # never stored, never published to
                self._answer(None, error_body(f"ResponseTopic: {problem}", None, "ResponseTopic"), reply)
                self._ack(message)
                return
            if message.retain:
                self._answer(None, error_body("payload: a retained job message is refused (it would run again on "
                                              "every reconnect); publish jobs without the retain flag",
                                              None, "payload"), reply)
                self._ack(message)
                return
            self._offer(message, reply, first=True)
        except Exception as exc:
            self._failed(message, reply, exc)

    def _reply_of(self, message: mqtt.MQTTMessage) -> dict[str, Any]:  # kept with the job
        reply: dict[str, Any] = {"fleet": not message.topic.startswith(f"{self.prefix}/")}
        props = message.properties
        if self.v5 and props is not None and getattr(props, "ResponseTopic", None) is not None:
            reply["response_topic"] = props.ResponseTopic
            correlation = getattr(props, "CorrelationData", None)
            if correlation is not None:
                reply["correlation"] = bytes(correlation).hex()
        return reply

    def _offer(self, message: mqtt.MQTTMessage, reply: dict[str, Any], first: bool) -> None:
        """Hand the message to the service; it is answered and acknowledged once its commit is done
        (on the journal's thread), so this thread goes on reading meanwhile."""
        # a redelivery carries the same packet id and payload
        dedup = hashlib.sha256(f"{message.topic}\0{message.mid}\0".encode() + message.payload).hexdigest()[:32]
        future = self.service.submit_payload_later(message.payload, "mqtt", reply, dedup_key=dedup,
                                                   redelivery=bool(message.dup))
        future.add_done_callback(lambda f: self._answered(message, reply, f, first))

    def _answered(self, message: mqtt.MQTTMessage, reply: dict[str, Any], future: Future, first: bool) -> None:
        try:
            answer = future.result()
            if answer.stopping:
                return  # not acknowledged, as above
            if answer.retry:  # the journal cannot be written: busy (once), kept unacknowledged, offered again
                if first:
                    self._reply(answer, reply)
                with self._lock:
                    self._held.append((message, reply))
                return
            self._reply(answer, reply)
            self._ack(message)  # only now: the job is committed or the refusal answered
        except Exception as exc:
            self._failed(message, reply, exc)

    def _failed(self, message: mqtt.MQTTMessage, reply: dict[str, Any], exc: Exception) -> None:
        """An unexpected failure: answered on <prefix>/errors, logged once, acknowledged (a message
        that fails every time must not come back after every restart)."""
        log.error("MQTT message %d on %s failed; answered on %s/errors and acknowledged", message.mid,
                  message.topic, self.prefix, exc_info=exc)
        self._answer(None, error_body(f"internal error: {type(exc).__name__}: {str(exc)[:200]}"), reply)
        self._ack(message)

    def _ack(self, message: mqtt.MQTTMessage) -> None:
        try:
            self.client.ack(message.mid, message.qos)
        except Exception as exc:  # e.g. the connection is gone: the broker redelivers, dedup_key matches
            log.warning("could not acknowledge MQTT message %d: %s", message.mid, exc)

    def _retry_held(self) -> None:
        with self._lock:
            held, self._held = self._held, []
        for message, reply in held:
            if self.accepting:
                self._offer(message, reply, first=False)

    # --- replies ------------------------------------------------------------------------------------
    def _reply(self, answer: Answer, reply: dict[str, Any]) -> None:
        record = answer.record
        if record is not None and record.finished_state:  # rejected now, or a duplicate of a finished job:
            self._publish_result(record, reply)  # (again) the result, to this sender's ResponseTopic
            return
        if record is not None:  # queued (new or duplicate): the first progress message says so
            self._publish_progress(record.id, answer.body, reply.get("fleet", False))
            if reply.get("response_topic") and not answer.created and reply != record.reply:
                with self._lock:  # a later sender of the same id wants the result too
                    self._also_reply.setdefault(record.id, []).append(reply)
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
                 retain: bool = False) -> mqtt.MQTTMessageInfo | None:
        """Publish, or log why not (a topic paho refuses, e.g. one stored by an older version): never raises."""
        try:
            properties = None
            if self.v5 and reply and reply.get("correlation") is not None:
                properties = Properties(PacketTypes.PUBLISH)
                properties.CorrelationData = bytes.fromhex(reply["correlation"])
            return self.client.publish(topic, json.dumps(body), qos=qos, retain=retain, properties=properties)
        except (ValueError, TypeError, RuntimeError, OSError) as exc:
            log.warning("cannot publish to %r: %s", topic[:100], exc)
            return None

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

    def _publish_result(self, record: JobRecord, reply: dict[str, Any] | None = None, fresh: bool = False) -> None:
        """The result on the job's topics and to ``reply`` (default: the submitter's, as journaled);
        ``fresh``: the job has just ended, so its image is also the retained latest one."""
        body = self._result_with_images(record, latest=fresh)
        reply = record.reply if reply is None else reply
        with self._lock:
            extra = self._also_reply.pop(record.id, []) if record.finished_state else []
        info = self._publish(f"{self.prefix}/jobs/{record.id}/result", body, self.qos)
        if reply.get("fleet") and self.fleet:
            self._publish(f"{self.fleet}/jobs/{record.id}/result", body, self.qos)
        for target in [reply, *extra]:
            if target.get("response_topic"):
                self._publish(target["response_topic"], body, self.qos, target)
        if record.source == "mqtt" and info is not None:  # delivered once the broker acknowledged this copy
            self._deliveries.expect(info, record.id)

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
        message), record which results the broker acknowledged, and offer held messages again."""
        interval = max(self.config.mqtt.progress_interval, 0.2)
        next_retry = 0.0
        while not self._closing.is_set():
            if self._state_dirty.wait(interval):
                if self._closing.is_set():
                    break
                self._state_dirty.clear()
                if self.client.is_connected():
                    self._publish(f"{self.prefix}/state", self.service.status(), qos=1, retain=True)
                else:
                    self._state_dirty.set()  # again after the reconnect
                self._closing.wait(interval)
            self._deliveries.record()
            if self._held and time.monotonic() >= next_retry:
                next_retry = time.monotonic() + RETRY_INTERVAL
                self._retry_held()
