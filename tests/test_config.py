from pathlib import Path

import pytest

from edge.config import Config, load_config
from edge.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_default_yaml_equals_builtin_defaults():
    assert load_config(ROOT / "configs" / "default.yaml") == Config()


def test_every_key_in_default_yaml_is_commented():
    lines = (ROOT / "configs" / "default.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip() and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
            assert lines[i - 1].lstrip().startswith("#"), f"key without comment: {line!r}"


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, words", [
    ("runtime:\n  thread: 2\n", "runtime.thread: unknown key"),
    ("runtime:\n  threads: two\n", "runtime.threads: must be int"),
    ("runtime:\n  threads: -1\n", "runtime.threads: must be 0 or more"),
    ("model:\n  precision: int4\n", "model.precision: 'int4' is not allowed; choose one of auto, fp32"),
    ("runtime:\n  graph_optimization: max\n", "choose one of auto, disabled, basic, extended, all"),
    ("http:\n  preview: tiny\n", "http.preview: 'tiny' is not allowed; choose one of auto, linear"),
    ("runtime:\n  providers: cpu\n", "runtime.providers: must be a list"),
    ("limits:\n  max_steps: 1.5\n", "limits.max_steps: must be int"),
    ("limits: [1]\n", "limits: must be a mapping"),
    ("runtime:\n  component_providers: {vae: [cpu]}\n", "runtime.component_providers.vae: unknown component"),
    ("runtime:\n  provider_options: [1]\n", "runtime.provider_options: must be a mapping"),
    ("memory:\n  headroom_mb: -5\n", "memory.headroom_mb: must be 0 or more"),
    ("model: {path: [1}\n", "not valid YAML"),
    ("limits:\n  min_guidance: 5\n  max_guidance: 2\n", "must not exceed"),
])
def test_bad_config_names_the_key(tmp_path, text, words):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert words in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_and_types(tmp_path):
    config = load_config(write(tmp_path, "runtime:\n  providers: [xnnpack, cpu]\ndefaults:\n  guidance: 5\n"),
                         {"runtime.threads": 3, "output.dir": "/tmp/x"})
    assert config.runtime.providers == ("xnnpack", "cpu")
    assert config.runtime.threads == 3 and config.output.dir == "/tmp/x"
    assert config.defaults.guidance == 5.0 and isinstance(config.defaults.guidance, float)
