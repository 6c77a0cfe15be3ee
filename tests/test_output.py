import errno
import json
import os
from dataclasses import replace
from datetime import datetime, timezone

import numpy as np
import pytest
from PIL import Image

from edge.errors import OutputError
from edge.jobs import parse_job
from edge.output import ImageMeta, atomic_write, image_path, parse_parameters, save_image, save_result


def meta(**job):
    j = parse_job({"prompt": "knolling of 2 red gears, pure white", "seed": 7, **job})
    return ImageMeta(job=j, seed=7, width=32, height=24, sampler="Euler a", model="tiny", extra={"t": 1})


def test_png_has_parameters_srgb_dpi_and_sidecar(tmp_path):
    img = Image.fromarray(np.arange(32 * 24 * 3, dtype=np.uint8).reshape(24, 32, 3))
    path = save_image(img, meta(negative_prompt="blurry, shadow", steps=4, guidance=7.5),
                      tmp_path, "job1")
    assert path.parent.parent == tmp_path and path.name.endswith("_job1_7.png")
    back = Image.open(path)
    assert back.info["parameters"] == ("knolling of 2 red gears, pure white\nNegative prompt: blurry, shadow\n"
                                       "Steps: 4, Sampler: Euler a, CFG scale: 7.5, Seed: 7, Size: 32x24, Model: tiny")
    assert parse_parameters(back.info["parameters"])["Seed"] == "7"
    assert back.info.get("srgb") == 0
    assert tuple(round(d) for d in back.info["dpi"]) == (300, 300)
    assert np.array_equal(np.asarray(back), np.asarray(img))
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["request"]["prompt"].startswith("knolling") and side["seed"] == 7 and side["t"] == 1
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_no_negative_line_when_empty_and_unicode_prompt(tmp_path):
    img = Image.new("RGB", (8, 8), "white")
    path = save_image(img, meta(prompt="Zahnräder ⚙️ 齿轮"), tmp_path, "j")
    text = Image.open(path).info["parameters"]
    assert text.splitlines()[0] == "Zahnräder ⚙️ 齿轮" and "Negative prompt" not in text


def test_atomic_write_replaces_whole(tmp_path):
    target = tmp_path / "a" / "f.bin"
    atomic_write(target, b"old")
    atomic_write(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert os.listdir(target.parent) == ["f.bin"]


def test_atomic_write_honours_the_umask_not_mkstemps_0600(tmp_path):
    previous = os.umask(0o027)
    try:
        atomic_write(tmp_path / "a.png", b"x")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.png").stat().st_mode & 0o777 == 0o640
    atomic_write(tmp_path / "b.png", b"x")
    assert (tmp_path / "b.png").stat().st_mode & 0o777 == 0o666 & ~previous


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk_is_a_clear_error(tmp_path, monkeypatch):
    real_fdopen = os.fdopen

    def full(fd, *a, **kw):  # writes to a real device that always answers ENOSPC
        os.dup2(os.open("/dev/full", os.O_WRONLY), fd)
        return real_fdopen(fd, *a, **kw)

    monkeypatch.setattr(os, "fdopen", full)
    with pytest.raises(OutputError, match="no space left"):
        atomic_write(tmp_path / "x.png", b"x" * 100000)
    assert list(tmp_path.iterdir()) == []


def test_an_image_set_that_cannot_be_written_leaves_neither_png_nor_sidecar(tmp_path, pipeline):
    """A prompt the PNG chunk cannot encode (a lone surrogate that bypassed parse_job) used to leave
    the first image's sidecar behind: the set is now encoded first, PNGs written before sidecars,
    and any failure removes the whole set."""
    result = pipeline.generate(parse_job({"prompt": "a gear", "steps": 2, "count": 2, "seed": 3}))
    result = replace(result, job=replace(result.job, prompt="a\ud800 gear"))
    when = datetime(2026, 1, 2, tzinfo=timezone.utc)
    with pytest.raises(UnicodeEncodeError):
        save_result(result, tmp_path, "u", model="m", provider="p", precision="fp32", when=when)
    assert not list(tmp_path.rglob("*.png")) and not list(tmp_path.rglob("*.json"))
    paths = save_result(replace(result, job=replace(result.job, prompt="a gear")), tmp_path, "u", model="m",
                        provider="p", precision="fp32", when=when)
    assert paths == [image_path(tmp_path, "u", s, when) for s in (3, 4)]
    # written PNGs first, sidecars last: every sidecar is at least as new as every PNG
    assert max(p.stat().st_mtime_ns for p in paths) <= min(p.with_suffix(".json").stat().st_mtime_ns for p in paths)


def test_edit_settings_follow_the_model_as_automatic1111_writes_them():
    from edge.output import parameters_text
    meta = ImageMeta(job=parse_job({"prompt": "make it blue", "steps": 20, "guidance": 7}), seed=5, width=512,
                     height=512, sampler="Euler", model="pix2pix", extra={},
                     settings={"Denoising strength": "0.6", "Mask blur": "4", "Image CFG scale": "1.5"})
    assert parameters_text(meta).endswith("Model: pix2pix, Denoising strength: 0.6, Mask blur: 4, Image CFG scale: 1.5")
    assert parse_parameters(parameters_text(meta))["Image CFG scale"] == "1.5"
