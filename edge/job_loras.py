"""The LoRAs a job asks for: the ``loras`` field and AUTOMATIC1111's ``<lora:name:strength>`` prompt tags.

Only the form and the limits are checked here (standard library only, like :mod:`edge.jobs`); whether a
name exists and fits the model is the runner's check at submit (:mod:`edge.lora_apply`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .errors import ValidationError
from .fields import shown

LORA_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
LORA_TAG = re.compile(r"<lora:([^:>]*)(?::([^:>]*))?>")


@dataclass(frozen=True)
class LoraRef:
    """A LoRA a job asks for: a file name in ``lora.dir`` (without ``.safetensors``) and its strength."""

    name: str
    strength: float = 1.0


def parse_loras(prompt: str, given: Any, max_loras: int) -> tuple[str, list[tuple[str, Any]]]:
    """The prompt without its ``<lora:...>`` tags, and (name, strength as given) for the ``loras`` field's
    entries and then the tags'; the strengths' range is :func:`edge.jobs.parse_job`'s to check."""
    if given is None:
        given = []
    if not isinstance(given, list):
        raise ValidationError("loras", f"must be a list of {{\"name\": ..., \"strength\": ...}}, got "
                              f"{type(given).__name__} {shown(given)}")
    entries: list[tuple[Any, Any]] = []
    for i, item in enumerate(given):
        if not isinstance(item, dict) or "name" not in item or set(item) - {"name", "strength"}:
            raise ValidationError("loras", f"item {i} must be an object with name and optional strength, got {shown(item)}")
        entries.append((item["name"], item.get("strength", 1.0)))
    for match in LORA_TAG.finditer(prompt):
        strength = match.group(2)
        try:
            entries.append((match.group(1), 1.0 if strength is None else float(strength)))
        except ValueError:
            raise ValidationError("loras", f"{shown(match.group(0))} in the prompt: the strength must be a number") from None
    stripped = " ".join(LORA_TAG.sub(" ", prompt).split()) if LORA_TAG.search(prompt) else prompt
    if len(entries) > max_loras:
        raise ValidationError("loras", f"{len(entries)} LoRAs asked for, the limit is {max_loras}")
    for name, _ in entries:
        if not isinstance(name, str) or not LORA_NAME.fullmatch(name):
            raise ValidationError("loras", f"name {shown(name)} must be 1 to 64 letters, digits, '_', '.' or '-'")
    names = [name for name, _ in entries]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise ValidationError("loras", f"{shown(twice)} is asked for twice")
    if not stripped.strip():
        raise ValidationError("prompt", "must not be empty once its <lora:...> tags are taken out")
    return stripped, entries
