"""Which image messages a result gets, and what it says about each: limits, inline, fleet, pruned files."""

import base64
import json

from edge.comms.mqtt_images import PACKET_OVERHEAD, image_messages, message_limit
from edge.jobs import Job, JobRecord, result_body


def record(tmp_path, sizes, returns="paths", fleet=False, state="done"):
    paths = []
    for k, size in enumerate(sizes):
        path = tmp_path / f"img{k}.png"
        path.write_bytes(b"\x89PNG" + bytes([k]) * (size - 4))
        paths.append(str(path))
    job = Job(prompt="a gear", id="j1", seed=1, count=len(sizes), return_=returns)
    return JobRecord(id="j1", job=job, state=state, seq=1, source="mqtt", reply={"fleet": fleet}, submitted=0.0,
                     started=0.0, finished=1.0, attempts=1, run_at=None, result={"paths": paths}, error=None,
                     delivered=False)


def test_each_image_on_its_topic_and_the_last_one_retained(tmp_path):
    r = record(tmp_path, [100, 200], fleet=True)
    out = image_messages(r, "p", "fl", True, 1000, None, 50, latest=True)
    assert [(t, len(b), retain) for t, b, retain in out.messages] == [
        ("p/jobs/j1/image/0", 100, False), ("fl/jobs/j1/image/0", 100, False),
        ("p/jobs/j1/image/1", 200, False), ("fl/jobs/j1/image/1", 200, False), ("p/image", 200, True)]
    assert out.entries == [{"index": 0, "topic": "p/jobs/j1/image/0", "bytes": 100},
                           {"index": 1, "topic": "p/jobs/j1/image/1", "bytes": 200}]
    # asked for again (get, a duplicate): the images, not the dashboard's "last image"
    assert "p/image" not in [t for t, _, _ in image_messages(r, "p", "fl", True, 1000, None, 50, False).messages]


def test_over_the_limit_a_note_instead_and_the_broker_limit_counts_too(tmp_path):
    r = record(tmp_path, [100, 5000])
    out = image_messages(r, "p", None, True, 1000, None, 50, latest=True)
    assert [t for t, _, _ in out.messages] == ["p/jobs/j1/image/0", "p/image"]
    assert out.messages[-1][1][:5] == b"\x89PNG\x00"  # the last image that fits
    assert out.entries[1]["topic"] is None and "5000 bytes, over the 1000-byte limit" in out.entries[1]["note"]
    broker = 400 + len("p/jobs/j1/image/0") + PACKET_OVERHEAD  # a broker that allows less than the config
    assert message_limit(1000, broker, "p/jobs/j1/image/0") == 400
    assert message_limit(1000, None, "p/jobs/j1/image/0") == 1000
    out = image_messages(record(tmp_path, [500]), "p", None, True, 1000, broker, 50, latest=False)
    assert not out.messages and "over the 400-byte limit" in out.entries[0]["note"]


def test_inline_base64_fills_the_one_result_message_up_to_the_limit(tmp_path):
    r = record(tmp_path, [300, 300, 300], returns="base64")
    size = len(json.dumps(result_body(r)))
    out = image_messages(r, "p", None, False, 1000 + size, None, size, latest=True)  # room for two of ~440 bytes
    assert not out.messages  # inline and publish_images off: nothing of its own, no retained image
    inline = [e for e in out.entries if "base64" in e]
    assert len(inline) == 2 and base64.b64decode(inline[0]["base64"]) == (tmp_path / "img0.png").read_bytes()
    assert out.entries[2]["topic"] is None and "note" in out.entries[2]  # the third did not fit


def test_nothing_for_unfinished_or_failed_jobs_or_when_switched_off_and_pruned_files_say_so(tmp_path):
    r = record(tmp_path, [100])
    assert image_messages(r, "p", None, False, 1000, None, 50, True).entries == []
    assert image_messages(record(tmp_path, [100], state="error"), "p", None, True, 1000, None, 50, True).entries == []
    (tmp_path / "img0.png").unlink()
    out = image_messages(r, "p", None, True, 1000, None, 50, True)
    assert not out.messages and "no longer on the device" in out.entries[0]["note"]
