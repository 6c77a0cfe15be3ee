import json

import pytest

from edge.errors import ValidationError
from edge.jobs import Defaults, Job, Limits, admit, decode_payload, parse_job, resolve_seed

def field_of(data, **kw):
    with pytest.raises(ValidationError) as info:
        parse_job(data, **kw)
    return info.value


def test_defaults_fill_missing_fields():
    job = parse_job({"prompt": "knolling of a red gear"}, defaults=Defaults(steps=7, guidance=3.0))
    assert (job.steps, job.guidance, job.seed, job.count, job.negative_prompt) == (7, 3.0, -1, 1, "")


@pytest.mark.parametrize("data, field, words", [
    ({}, "prompt", "required"),
    ({"prompt": "   "}, "prompt", "empty"),
    ({"prompt": 3}, "prompt", "string"),
    ({"prompt": "x" * 1001}, "prompt", "limit is 1000"),
    ({"prompt": "a", "steps": -1}, "steps", "between 1 and 150"),
    ({"prompt": "a", "steps": 0}, "steps", "between 1 and 150"),
    ({"prompt": "a", "steps": "20"}, "steps", "integer"),
    ({"prompt": "a", "steps": True}, "steps", "integer"),
    ({"prompt": "a", "steps": 2.5}, "steps", "integer"),
    ({"prompt": "a", "guidance": 31}, "guidance", "between 0 and 30"),
    ({"prompt": "a", "guidance": -0.5}, "guidance", "between 0 and 30"),
    ({"prompt": "a", "guidance": float("nan")}, "guidance", "between"),
    ({"prompt": "a", "seed": -2}, "seed", "between -1"),
    ({"prompt": "a", "count": 9}, "count", "between 1 and 8"),
    ({"prompt": "a", "width": 4}, "width", "between 8 and 2048"),
    ({"prompt": "a", "height": 4096}, "height", "between 8 and 2048"),
    ({"prompt": "a", "id": "../etc"}, "id", "letters, digits"),
    ({"prompt": "a", "id": "x\n"}, "id", "letters, digits"),  # a trailing newline is not part of an id
    ({"prompt": "a", "step": 5}, "step", "not a job field"),
    ({"prompt": "a", "priority": 11}, "priority", "between -10 and 10"),
    ({"prompt": "a", "return": "png"}, "return", "must be one of paths, base64"),
    ({"prompt": "a", "return_": "base64"}, "return_", "not a job field"),
])
def test_bad_fields_are_named(data, field, words):
    err = field_of(data)
    assert err.field == field
    assert words in str(err)
    assert str(err).startswith(field + ":")


def test_limits_come_from_config():
    limits = Limits(max_steps=10)
    assert field_of({"prompt": "a", "steps": 11}, limits=limits).reason == "must be between 1 and 10, got 11"


def test_integral_float_accepted_as_int():
    assert parse_job({"prompt": "a", "steps": 4.0}).steps == 4


@pytest.mark.parametrize("payload, words", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
    (b"[1, 2]", "must be a JSON object"),
    (b"x" * 20000, "limit is 16384"),
])
def test_bad_payloads(payload, words):
    with pytest.raises(ValidationError) as info:
        decode_payload(payload, Limits())
    assert info.value.field == "payload" and words in str(info.value)


def test_payload_round_trip():
    data = decode_payload(json.dumps({"prompt": "exploded view", "seed": 5}).encode(), Limits())
    assert parse_job(data).seed == 5


def test_resolve_seed():
    assert resolve_seed(parse_job({"prompt": "a", "seed": 42})).seed == 42
    seeds = {resolve_seed(parse_job({"prompt": "a"})).seed for _ in range(5)}
    assert all(0 <= s < 2**32 for s in seeds) and len(seeds) > 1


def test_admit_fixes_id_and_seed_once():
    job = admit(parse_job({"prompt": "a"}))
    assert job.id and job.seed >= 0 and admit(job) == job
    assert admit(parse_job({"prompt": "a", "id": "mine", "seed": 3})).id == "mine"


def test_return_is_a_wire_field_and_survives_the_journal_round_trip():
    job = parse_job({"prompt": "a gear", "return": "base64"})
    assert job.return_ == "base64" and parse_job({"prompt": "a gear"}).return_ == "paths"
    data = job.to_dict()
    assert data["return"] == "base64" and "return_" not in data
    assert Job.from_dict(json.loads(json.dumps(data))) == job
    old = {k: v for k, v in data.items() if k != "return"}  # a journal row from before the field
    assert Job.from_dict(old).return_ == "paths"


# --- payloads that once escaped the validator (issue 12): each is refused naming the field --------
HOSTILE = [
    (b"[" * 3000, "payload", "nested too deeply"),  # RecursionError inside json
    (b'{"prompt": "a", "seed": 1' + b"0" * 5000 + b"}", "payload", "more than 4300 digits"),  # ValueError
    (b'{"prompt": "a", "guidance": 1' + b"0" * 400 + b"}", "guidance", "an integer of 401 digits"),  # OverflowError
    (b'{"prompt": "a\\ud800 gears"}', "prompt", "lone surrogate"),  # no file, topic or PNG chunk holds it
    (b'{"prompt": "a", "negative_prompt": "\\udfff"}', "negative_prompt", "lone surrogate"),
    (b'{"\\udc80": 1, "prompt": "a"}', "\udc80", "is not a job field"),  # JSON output escapes it again
    (b'{"prompt": "a", "steps": 1e400}', "steps", "must be an integer, got float inf"),
    (b'{"prompt": "a", "seed": [' + b"[" * 900 + b"]" * 900 + b"]}", "seed", "must be an integer, got list of 1"),
]


@pytest.mark.parametrize("payload, field, words", HOSTILE)
def test_hostile_payloads_are_refused_with_the_field(payload, field, words):
    with pytest.raises(ValidationError) as info:
        parse_job(decode_payload(payload, Limits(max_payload_bytes=1 << 20)))
    assert info.value.field == field and words in str(info.value), str(info.value)
    assert len(str(info.value)) < 300  # the message never echoes a whole hostile value


def test_a_str_payload_with_a_lone_surrogate_is_refused_not_raised():
    with pytest.raises(ValidationError) as info:
        parse_job(decode_payload('{"prompt": "a\ud800"}', Limits()))
    assert info.value.field == "prompt"
