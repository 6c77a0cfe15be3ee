"""The content policy for classrooms: a prompt blocklist of words and regular expressions.

A blocked job is answered ``rejected: policy`` and never runs. Only the prompt is checked: the
negative prompt says what the image must *not* show, so blocked words are expected there.
Matching is case-insensitive; words match whole words (``gun`` blocks "a gun" and "GUN", not
"begun"), so a blocklist does not refuse harmless words that contain a blocked one.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    rule: str | None = None  # the word or pattern that matched, for the log (never sent to the client)


class ContentPolicy:
    def __init__(self, blocked_words: tuple[str, ...] = (), blocked_patterns: tuple[str, ...] = ()):
        rules: list[tuple[str, re.Pattern[str]]] = []
        for word in blocked_words:
            # \b does not work next to non-word characters ("c++"), so use lookarounds instead
            words = r"\s+".join(re.escape(w) for w in _normalize(word).split())
            if words:
                rules.append((f"word {word!r}", re.compile(rf"(?<!\w){words}(?!\w)", re.IGNORECASE)))
        for pattern in blocked_patterns:
            rules.append((f"pattern {pattern!r}", re.compile(pattern, re.IGNORECASE)))
        self._rules = rules

    def __bool__(self) -> bool:
        return bool(self._rules)

    def check(self, prompt: str) -> Verdict:
        text = _normalize(prompt)
        for name, rule in self._rules:
            if rule.search(text):
                return Verdict(False, name)
        return Verdict(True)


def _normalize(text: str) -> str:
    # NFKC folds look-alike forms (full-width letters, ligatures) that would slip past a word list
    return unicodedata.normalize("NFKC", text)
