"""The MQTT front end's request topics beside ``<prefix>/jobs``: stored results, history, cancel, prompts, Home Assistant.

- ``<prefix>/jobs/<id>/get``: the stored result again on ``<prefix>/jobs/<id>/result`` (with its
  images), so a client that subscribes after the job ended still gets it; while the job is queued
  or running its state on ``<prefix>/jobs/<id>/progress``; an unknown id: an error on the result topic.
- ``<prefix>/history/get``: payload empty or ``{"limit": N, "before": ID}``; a page of the journal,
  newest first, on ``<prefix>/history`` (``{"status", "jobs", "next"}``; ``next`` is the next ``before``).
- ``<prefix>/cancel``: ``running`` cancels the running job (Home Assistant's button), any other
  payload is taken as a job id.
- ``<prefix>/prompt``: plain text, submitted as the prompt of a job with the config's defaults
  (Home Assistant's text entity).
- ``<discovery prefix>/status`` (with ``mqtt.homeassistant``): ``online`` publishes discovery again.

Each request also gets its answer on an MQTT 5 ResponseTopic, with its CorrelationData. The
handlers are registered per topic (``message_callback_add``), acknowledge each message once it is
answered, and never let an exception into paho's network thread.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import TYPE_CHECKING, Any, Callable

import paho.mqtt.client as mqtt

from .. import __version__
from ..errors import ValidationError
from ..jobs import decode_payload, error_body
from ..mqtt_guard import topic_problem
from . import homeassistant as ha

if TYPE_CHECKING:
    from .mqtt import MqttFrontEnd

log = logging.getLogger(__name__)


class RequestTopics:
    """Subscribes, answers and acknowledges the request topics of one :class:`MqttFrontEnd`."""

    def __init__(self, front: MqttFrontEnd):
        self.front = front
        prefix = front.prefix
        self.handlers: dict[str, Callable[[mqtt.MQTTMessage, dict[str, Any]], bool]] = {
            f"{prefix}/jobs/+/get": self._get,
            f"{prefix}/history/get": self._history,
            ha.cancel_topic(prefix): self._cancel,
            ha.prompt_topic(prefix): self._prompt,
        }
        if front.config.mqtt.homeassistant:
            self.handlers[ha.status_topic(front.config)] = self._homeassistant_status

    def topics(self) -> list[str]:
        return list(self.handlers)

    def install(self, client: mqtt.Client) -> None:
        for topic, handler in self.handlers.items():
            client.message_callback_add(topic, self._guarded(handler))

    def _guarded(self, handler: Callable[[mqtt.MQTTMessage, dict[str, Any]], bool]) -> Callable:
        def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
            if not self.front.accepting:
                return  # not acknowledged: the broker keeps it for the next run
            answered = True
            try:
                reply = self.front._reply_of(message)
                problem = topic_problem(reply["response_topic"]) if "response_topic" in reply else None
                if problem is not None:  # never published to: answered on the errors topic instead
                    del reply["response_topic"]
                    self._answer(f"{self.front.prefix}/errors",
                                 error_body(f"ResponseTopic: {problem}", None, "ResponseTopic"), reply)
                else:
                    answered = handler(message, reply)
            except Exception as exc:  # answered and acknowledged: never redelivered forever
                log.exception("request on %s failed", message.topic)
                try:
                    self.front._publish(f"{self.front.prefix}/errors", error_body(
                        f"internal error on {message.topic}: {type(exc).__name__}: {exc}"), self.front.qos)
                except Exception:
                    log.exception("could not publish the error either")
            if answered:  # False: e.g. the service is stopping; left to the broker for the next run
                self.front._ack(message)
        return on_message

    # --- connect ------------------------------------------------------------------------------------
    def on_connect(self) -> None:
        """Discovery configs (or their removal) at every connect: retained, so Home Assistant has them."""
        m = self.front.config.mqtt
        if m.homeassistant:
            self.publish_discovery()
        elif m.homeassistant_remove:
            for topic in ha.config_topics(self.front.config, self.front.service.device_id):
                self.front.client.publish(topic, b"", qos=1, retain=True)
            log.info("removed the Home Assistant discovery configs (mqtt.homeassistant_remove)")

    def reconfigured(self) -> None:
        """Home Assistant's text entity carries limits.max_prompt_chars: discovery again, retained."""
        if self.front.config.mqtt.homeassistant and self.front.client.is_connected():
            self.publish_discovery()

    def publish_discovery(self) -> None:
        service = self.front.service
        messages = ha.discovery(self.front.config, service.device_id, self.front.prefix, service.runner.model,
                                __version__)
        for topic, payload in messages:
            self.front.client.publish(topic, json.dumps(payload), qos=1, retain=True)
        log.info("published %d Home Assistant discovery configs under %s/", len(messages),
                 self.front.config.mqtt.discovery_prefix)

    # --- handlers: True once answered (acknowledge), False to leave the message to the broker ------------
    def _answer(self, topic: str, body: dict[str, Any], reply: dict[str, Any]) -> None:
        self.front._publish(topic, body, self.front.qos)
        if reply.get("response_topic"):
            self.front._publish(reply["response_topic"], body, self.front.qos, reply)

    def _get(self, message: mqtt.MQTTMessage, reply: dict[str, Any]) -> bool:
        job_id = message.topic.split("/")[-2]
        prefix, service = self.front.prefix, self.front.service
        record = service.record(job_id)
        if record is not None and record.finished_state:
            self._answer(f"{prefix}/jobs/{record.id}/result", self.front._result_with_images(record), reply)
            return True
        body = service.get(job_id)  # queued or running: where it stands; unknown: the error naming the id
        topic = "result" if body["status"] == "error" else "progress"
        self._answer(f"{prefix}/jobs/{body['id']}/{topic}" if body.get("id") else f"{prefix}/errors", body, reply)
        return True

    def _history(self, message: mqtt.MQTTMessage, reply: dict[str, Any]) -> bool:
        try:  # empty, or {"limit": N, "before": ID}
            request = decode_payload(message.payload, self.front.service.config.limits) if message.payload.strip() else {}
        except ValidationError as exc:
            body = error_body(str(exc), None, exc.field)
        else:
            body = self.front.service.history(request.get("limit", 20), request.get("before"))
        self._answer(f"{self.front.prefix}/history", body, reply)
        return True

    def _cancel(self, message: mqtt.MQTTMessage, reply: dict[str, Any]) -> bool:
        service = self.front.service
        target = message.payload.decode("utf-8", errors="replace").strip()
        if target == ha.CANCEL_PRESS:
            current = service.status()["current"]
            if current is None:
                body = error_body("id: no job is running; nothing to cancel", None, "id")
                self._answer(f"{self.front.prefix}/errors", body, reply)
                return True
            target = current["id"]
        body = service.cancel(target)
        log.info("cancel of %r over MQTT: %s", target, body.get("error") or body.get("state"))
        if reply.get("response_topic"):
            self.front._publish(reply["response_topic"], body, self.front.qos, reply)
        elif body["status"] == "error":
            self.front._publish(f"{self.front.prefix}/errors", body, self.front.qos)
        return True

    def _prompt(self, message: mqtt.MQTTMessage, reply: dict[str, Any]) -> bool:
        if message.retain:  # like a retained job: it would run again at every reconnect
            self._answer(f"{self.front.prefix}/errors",
                         error_body("payload: a retained prompt is refused (it would run again on every "
                                    "reconnect)", None, "payload"), reply)
            return True
        dedup = hashlib.sha256(f"{message.topic}\0{message.mid}\0".encode() + message.payload).hexdigest()[:32]
        answer = self.front.service.submit_data(ha.prompt_job(message.payload), "mqtt", reply, dedup_key=dedup,
                                                redelivery=bool(message.dup))
        if answer.stopping:
            return False
        self.front._reply(answer, reply)
        return not answer.retry  # the journal cannot be written: busy, and left to the broker to offer again

    def _homeassistant_status(self, message: mqtt.MQTTMessage, reply: dict[str, Any]) -> bool:
        if message.payload.strip() == b"online":
            self.publish_discovery()
        return True
