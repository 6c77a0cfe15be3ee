"""Property-based tests (hypothesis): whatever a client sends, the parser and both front ends answer.

Bounded: the parser's properties and the in-process socket run in the fast lane (a few seconds);
the real daemon's socket and MQTT front ends run under ``slow``. The long run is
benchmarks/fuzz_frontends.py (10,000 payloads per front end).
"""

import json
import math
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon_harness import broker, daemons, listeners, needs_mosquitto, response_props, wait_until  # noqa: F401
from edge.errors import ValidationError
from edge.jobs import ID_PATTERN, JOB_FIELDS, Job, Limits, decode_payload, error_body, parse_job
from test_socket_api import Served

# text as a hostile client sends it: any code point, lone surrogates included
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=40)
NUMBERS = st.one_of(st.integers(), st.integers(min_value=10**300, max_value=10**400), st.floats(),
                    st.booleans(), st.none())
SCALARS = st.one_of(NUMBERS, ANY_TEXT)
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(ANY_TEXT, inner, max_size=4)),
                           max_leaves=12)
FIELD_VALUES = st.one_of(JSON_VALUES, st.integers(1, 30), st.sampled_from(["a gear", "euler", "x" * 1001, "ok-1"]))
JOBS = st.dictionaries(st.one_of(st.sampled_from(JOB_FIELDS), ANY_TEXT), FIELD_VALUES, max_size=6)
DEEP = st.integers(1, 5000).map(lambda n: ("[" * n + "]" * n).encode())


def as_payload(data):
    return json.dumps(data).encode()  # ensure_ascii: surrogates travel as \ud800 escapes, as a client sends them


PAYLOADS = st.one_of(st.binary(max_size=300), JOBS.map(as_payload), JSON_VALUES.map(as_payload), DEEP,
                     st.integers(4000, 6000).map(lambda n: b'{"prompt": "a", "seed": ' + b"9" * n + b"}"))


def check_refusal(exc: ValidationError) -> None:
    assert isinstance(exc.field, str) and str(exc).startswith(f"{exc.field}:")
    assert len(str(exc)) < 400
    json.dumps(error_body(str(exc), None, exc.field)).encode("utf-8")  # the answer can always be sent


def check_job(job: Job, limits: Limits) -> None:
    job.prompt.encode("utf-8")
    job.negative_prompt.encode("utf-8")
    assert 0 < len(job.prompt) <= limits.max_prompt_chars and "\x00" not in job.prompt
    assert 1 <= job.steps <= limits.max_steps and 1 <= job.count <= limits.max_count
    assert math.isfinite(job.guidance) and limits.min_guidance <= job.guidance <= limits.max_guidance
    assert job.id is None or ID_PATTERN.fullmatch(job.id)


@settings(max_examples=300, deadline=None)
@given(PAYLOADS)
def test_any_payload_is_a_valid_job_or_a_refusal_naming_the_field(raw):
    limits = Limits()
    try:
        check_job(parse_job(decode_payload(raw, limits), limits), limits)
    except ValidationError as exc:
        check_refusal(exc)


@settings(max_examples=300, deadline=None)
@given(JOBS)
def test_any_job_dict_is_a_valid_job_or_a_refusal_naming_the_field(data):
    try:
        check_job(parse_job(data), Limits())
    except ValidationError as exc:
        check_refusal(exc)


def test_the_socket_answers_every_line_in_process(tmp_path, pipeline):
    s = Served(tmp_path, pipeline, **{"daemon.max_queue": 10**6})  # no worker: nothing is generated

    @settings(max_examples=100, deadline=None)
    @given(PAYLOADS)
    def answered(raw):
        line = raw.replace(b"\n", b" ")
        with s.client() as c:
            reply = c.request(b'{"op": "submit", "job": ' + line + b"}\n" if line[:1] == b"{" else line + b"\n")
            assert reply["status"] in ("queued", "error", "ok"), reply
            assert c.request({"op": "status"})["status"] == "ok"  # the connection stays usable

    try:
        answered()
    finally:
        s.close()


# --- against a real daemon ---------------------------------------------------------------------------------
@pytest.mark.slow
@needs_mosquitto
def test_both_front_ends_of_a_real_daemon_answer_every_payload(broker, daemons, listeners):
    d = daemons("fz", broker, {"daemon": {"max_queue": 10**6}, "defaults": {"steps": 1}}).start()
    watch = listeners(broker.port, ["fuzz/reply/#"])
    sent = []

    @settings(max_examples=150, deadline=None)
    @given(PAYLOADS)
    def through_both(raw):
        with d.client() as c:  # the socket: exactly one reply line per request line
            reply = c.request(raw.replace(b"\n", b" ") + b"\n")
            assert reply["status"] in ("queued", "error", "ok", "running"), reply
        correlation = uuid.uuid4().bytes
        props = response_props(f"fuzz/reply/{len(sent)}", correlation)
        watch.publish(f"{d.prefix}/jobs", raw, properties=props)
        sent.append(correlation)

    through_both()
    answered = lambda: {m.properties.CorrelationData for m in watch.messages} >= set(sent)  # noqa: E731
    wait_until(answered, 60, f"answers to all {len(sent)} MQTT payloads")
    assert d.alive() and "Traceback" not in d.log()
