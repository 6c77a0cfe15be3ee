"""Home Assistant MQTT discovery against a real Mosquitto and a real daemon: what Home Assistant would
read, what it would send (text, button, its birth message) and what comes back (the picture)."""

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from daemon_harness import broker, daemons, listeners, needs_mosquitto, topic_is, wait_until  # noqa: F401

from edge.comms import homeassistant as ha
from edge.config import load_config


HA = {"mqtt": {"homeassistant": True}}

# The configuration variables Home Assistant's documentation lists for MQTT discovery
# (home-assistant.io/integrations/{text,image,sensor,button}.mqtt and /integrations/mqtt, "MQTT
# discovery"): anything else in a payload would be dropped by the integration's schema.
COMMON = {"availability", "availability_mode", "availability_template", "availability_topic", "default_entity_id",
          "device", "enabled_by_default", "encoding", "entity_category", "entity_picture", "icon",
          "json_attributes_template", "json_attributes_topic", "name", "object_id", "origin", "payload_available",
          "payload_not_available", "platform", "qos", "unique_id"}
PLATFORMS = {
    "text": ({"command_topic"}, {"command_template", "command_topic", "max", "min", "mode", "pattern", "retain",
                                 "state_topic", "value_template"}),
    "image": (set(), {"content_type", "image_encoding", "image_topic", "url_template", "url_topic"}),
    "sensor": ({"state_topic"}, {"device_class", "expire_after", "force_update", "last_reset_value_template",
                                 "options", "suggested_display_precision", "state_class", "state_topic",
                                 "unit_of_measurement", "value_template"}),
    "button": ({"command_topic"}, {"command_template", "command_topic", "device_class", "payload_press", "retain"}),
}
DEVICE = {"configuration_url", "connections", "hw_version", "identifiers", "manufacturer", "model", "model_id",
          "name", "serial_number", "suggested_area", "sw_version", "via_device"}
ORIGIN = {"name", "sw_version", "support_url"}
TOPIC = re.compile(r"homeassistant/(text|image|sensor|button)/([a-zA-Z0-9_-]+)/([a-zA-Z0-9_-]+)/config")


def payload(m):
    return json.loads(m.payload)


def check_discovery(topic, config, prefix):
    """One discovery message as Home Assistant's MQTT integration validates it."""
    match = TOPIC.fullmatch(topic)
    assert match, topic
    component = match.group(1)
    required, fields = PLATFORMS[component]
    assert set(config) <= COMMON | fields, (topic, set(config) - COMMON - fields)
    assert required <= set(config), topic
    assert isinstance(config["name"], str) and config["name"]
    assert re.fullmatch(r"[a-zA-Z0-9_-]+", config["unique_id"])  # a device needs a unique_id to register
    device = config["device"]
    assert set(device) <= DEVICE and device["identifiers"] and {"name", "model", "sw_version"} <= set(device)
    # since 2023.8 an entity name is the entity's own part; one that repeats the device name is warned about
    assert not config["name"].lower().startswith(device["name"].lower())
    assert set(config["origin"]) <= ORIGIN and config["origin"]["name"]
    assert (config["availability_topic"], config["payload_available"], config["payload_not_available"]) == \
        (f"{prefix}/status", "online", "offline")
    for key in ("command_topic", "state_topic", "image_topic", "json_attributes_topic", "availability_topic"):
        if key in config:
            assert isinstance(config[key], str) and config[key] and not set(config[key]) & set("+#\0"), (topic, key)
    if "qos" in config:
        assert config["qos"] in (0, 1, 2)
    if "entity_category" in config:
        assert config["entity_category"] in ("config", "diagnostic")
    if component == "text":
        assert 0 <= config.get("min", 0) < config.get("max", 255) <= 255 and config.get("mode", "text") in ("text", "password")
    if component == "image":  # exactly one source; content_type only with image_topic
        assert ("image_topic" in config) != ("url_topic" in config)
        assert config["content_type"] == "image/png" and "url_topic" not in config
    if component == "sensor":
        assert config.get("state_class", "measurement") in ("measurement", "measurement_angle", "total",
                                                            "total_increasing")
        if config.get("device_class") == "duration":
            assert config["unit_of_measurement"] in ("d", "h", "min", "s", "ms")
    if component == "button":
        assert isinstance(config.get("payload_press", "PRESS"), str)
    return component, match.group(3)


def discovery_of(watch, n):
    messages = watch.wait_count(lambda m: m.topic.endswith("/config"), n, what=f"{n} discovery messages")
    return {m.topic: m for m in messages[-7:]}


def all_seven(configs):
    return configs if len(configs) == 7 else None


@pytest.mark.slow
@needs_mosquitto
def test_discovery_parses_as_home_assistant_expects_and_comes_again_when_it_comes_online(broker, daemons, listeners):
    d = daemons("ha1", broker, HA).start()
    watch = listeners(broker.port, ["homeassistant/#", f"{d.prefix}/state"])
    configs = {t: payload(m) for t, m in discovery_of(watch, 7).items()}
    retained = wait_until(lambda: all_seven(retained_configs(listeners, broker.port)), 10, "the retained configs")
    assert {t: json.loads(p) for t, p in retained.items()} == configs  # a newcomer gets them, retained
    entities = {check_discovery(t, c, d.prefix): c for t, c in configs.items()}
    assert sorted(entities) == sorted([("text", "prompt"), ("image", "image"), ("sensor", "state"),
                                       ("sensor", "queue"), ("sensor", "last_duration"), ("sensor", "precision"),
                                       ("button", "cancel")])
    assert len({c["unique_id"] for c in configs.values()}) == 7
    assert len({json.dumps(c["device"], sort_keys=True) for c in configs.values()}) == 1  # one device
    device = entities[("text", "prompt")]["device"]
    assert device["model"] == "knolling-tiny" and device["name"] == "edge-imagegen ha1"
    assert entities[("image", "image")]["image_topic"] == f"{d.prefix}/image"
    # every field the sensors' templates read is in the retained state
    state = payload(watch.wait_for(topic_is(f"{d.prefix}/state")))
    for (component, _), config in entities.items():
        if component == "sensor":
            assert config["state_topic"] == f"{d.prefix}/state"
            for name in re.findall(r"value_json\.(\w+)", config["value_template"]):
                assert name in state, (name, config["value_template"])
    assert state["precision"] == "fp32"
    # Home Assistant restarts: its birth message brings the whole discovery again
    watch.publish("homeassistant/status", "online")
    again = discovery_of(watch, 14)
    assert {t: payload(m) for t, m in again.items()} == configs
    watch.publish("homeassistant/status", "offline")  # its last will: nothing to do
    watch.publish("homeassistant/status", "online")
    discovery_of(watch, 21)
    assert d.alive()


@pytest.mark.slow
@needs_mosquitto
def test_text_command_runs_a_job_and_the_image_entity_gets_the_picture_and_the_button_cancels(broker, daemons,
                                                                                               listeners):
    d = daemons("ha2", broker, HA).start()
    watch = listeners(broker.port, ["homeassistant/#", f"{d.prefix}/image", f"{d.prefix}/jobs/+/result",
                                    f"{d.prefix}/jobs/+/progress"])
    configs = {check_discovery(t, payload(m), d.prefix): payload(m) for t, m in discovery_of(watch, 7).items()}
    text, image, button = configs[("text", "prompt")], configs[("image", "image")], configs[("button", "cancel")]
    # what Home Assistant publishes when the text entity is set: the value as it is, on command_topic
    watch.publish(text["command_topic"], "exploded view of a blue battery", qos=text["qos"])
    picture = watch.wait_for(topic_is(image["image_topic"]), timeout=120, what="the picture on the image topic")
    result = payload(watch.wait_for(lambda m: m.topic.endswith("/result")))
    assert result["status"] == "ok"
    assert picture.payload == Path(result["paths"][0]).read_bytes() and picture.payload[:4] == b"\x89PNG"
    job = d.jobs()[result["id"]]
    assert job["state"] == "done"
    with d.client() as c:  # the config's defaults made the job
        entry = c.history(1)["jobs"][0]
    assert entry["prompt"] == "exploded view of a blue battery" and entry["job"]["steps"] == 20
    # the button: Home Assistant publishes payload_press on its command_topic
    watch.publish(f"{d.prefix}/jobs", json.dumps({"id": "long", "prompt": "a gear", "steps": 150}))
    watch.wait_for(lambda m: m.topic == f"{d.prefix}/jobs/long/progress" and payload(m).get("step", 0) >= 2,
                   what="the long job under way")
    watch.publish(button["command_topic"], button["payload_press"], qos=button["qos"])
    cancelled = payload(watch.wait_for(topic_is(f"{d.prefix}/jobs/long/result"), what="the cancelled result"))
    assert cancelled["status"] == "error" and cancelled["state"] == "cancelled"
    assert d.jobs()["long"]["state"] == "cancelled"


@pytest.mark.slow
@needs_mosquitto
def test_a_sighup_that_lowers_the_prompt_limit_republishes_the_text_entity_max(broker, daemons, listeners):
    """Home Assistant refuses text longer than the entity's max before sending it; a stale max would
    let it send prompts the daemon then rejects."""
    d = daemons("ha4", broker, HA).start()
    watch = listeners(broker.port, ["homeassistant/#"])
    text = next(payload(m) for t, m in discovery_of(watch, 7).items() if "/text/" in t)
    assert text["max"] == 255  # Home Assistant's own ceiling for a text entity
    config = yaml.safe_load(d.config_path.read_text())
    config["limits"] = {"max_prompt_chars": 120}
    d.config_path.write_text(yaml.safe_dump(config))
    d.proc.send_signal(signal.SIGHUP)
    again = discovery_of(watch, 14)
    assert next(payload(m) for t, m in again.items() if "/text/" in t)["max"] == 120
    retained = wait_until(lambda: all_seven(retained_configs(listeners, broker.port)), 10, "the retained configs")
    assert json.loads(next(p for t, p in retained.items() if "/text/" in t))["max"] == 120
    assert d.alive()


def retained_configs(listeners, port):
    """The retained discovery configs a newcomer gets (a marker published after the subscription
    arrives after every retained message)."""
    probe = listeners(port, ["homeassistant/#"])
    probe.publish("homeassistant/zz/marker", "x")
    probe.wait_for(topic_is("homeassistant/zz/marker"))
    return {m.topic: m.payload for m in probe.messages if m.topic.endswith("/config")}


@pytest.mark.slow
@needs_mosquitto
def test_ha_remove_and_the_config_switch_remove_the_device(broker, daemons, listeners):
    d = daemons("ha3", broker, HA).start()
    wait_until(lambda: all_seven(retained_configs(listeners, broker.port)), 10, "the discovery configs")
    assert d.terminate() == 0
    run = subprocess.run([sys.executable, "-m", "edge.cli", "ha-remove", "--config", str(d.config_path)],
                         capture_output=True, text=True, timeout=60, cwd="/")
    assert run.returncode == 0, run.stderr
    assert "removed 7 Home Assistant discovery configs of ha3" in run.stderr
    assert retained_configs(listeners, broker.port) == {}  # empty retained configs: Home Assistant forgets them
    d.start()  # announced again at connect
    wait_until(lambda: all_seven(retained_configs(listeners, broker.port)), 10, "the discovery configs again")
    assert d.terminate() == 0
    removing = daemons("ha3", broker, {"mqtt": {"homeassistant": False, "homeassistant_remove": True}}).start()
    wait_until(lambda: retained_configs(listeners, broker.port) == {}, 10, "the configs removed by the switch")
    assert "removed the Home Assistant discovery configs" in removing.log()
    # nobody listening on port 1: a clear error, no traceback
    bad = d.config_path.with_name("bad.yaml")
    bad.write_text(d.config_path.read_text().replace(f"port: {broker.port}", "port: 1"))
    run = subprocess.run([sys.executable, "-m", "edge.cli", "ha-remove", "--config", str(bad)],
                         capture_output=True, text=True, timeout=60, cwd="/")
    assert run.returncode == 2 and "mqtt: cannot connect to 127.0.0.1:1" in run.stderr and "Traceback" not in run.stderr


def test_discovery_payloads_in_process_fit_the_schema_and_name_what_removal_empties():
    config = load_config(None, {"mqtt.homeassistant": True, "mqtt.discovery_prefix": "homeassistant",
                                "limits.max_prompt_chars": 2000})
    messages = ha.discovery(config, "pi.5", "edge-imagegen/pi.5", "knolling-tiny", "9.9")
    for topic, config_payload in messages:
        check_discovery(topic, config_payload, "edge-imagegen/pi.5")
        assert "/edge_imagegen_pi_5/" in topic  # '.' is not allowed in a discovery topic's node id
    text = dict(messages)["homeassistant/text/edge_imagegen_pi_5/prompt/config"]
    assert text["max"] == 255  # Home Assistant's own bound on a text state, under limits.max_prompt_chars
    assert [t for t, _ in messages] == ha.config_topics(config, "pi.5")
    assert ha.prompt_job(" a red gear\n".encode()) == {"prompt": "a red gear"}
