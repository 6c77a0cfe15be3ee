"""The tokenizer files of a bundle: vocab.json, merges.txt and transformers' settings files,
read and checked as transformers reads them (errors name the file and what was expected)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

from .bundle import read_json
from .errors import BundleError

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 77
CLIP_MAX_MERGES = 49152 - 256 - 2  # transformers (like OpenAI CLIP) reads no more merges than this
START_TOKEN, END_TOKEN = "<|startoftext|>", "<|endoftext|>"
# CLIP defaults when the config files don't say; pad = end token is what SD 1.x ships.
DEFAULT_SPECIALS = {"bos_token": START_TOKEN, "eos_token": END_TOKEN, "unk_token": END_TOKEN, "pad_token": END_TOKEN}
# transformers writes model_max_length = int(1e30) when none was given. No CLIP text encoder
# takes anywhere near a million tokens, so anything that large means "not set".
_UNSET_MAX_LENGTH = 1_000_000


class SpecialToken(NamedTuple):
    """A token matched verbatim in the prompt before BPE (transformers' "added token")."""
    content: str
    id: int
    normalized: bool  # matched in the normalised (lower-cased) text, else in the raw text


def read_vocab(path: Path) -> dict[str, int]:
    expected = "the CLIP BPE vocabulary, a JSON object mapping token -> id"
    vocab = read_json(path, expected)
    if not vocab:
        raise BundleError(f"{path}: empty; expected {expected}")
    for token, token_id in vocab.items():
        if type(token_id) is not int or token_id < 0:  # not isinstance: True is an int too
            raise BundleError(f"{path}: token {token!r} has id {token_id!r}; expected {expected} "
                              f"with non-negative integer ids")
    return vocab


def read_merges(path: Path, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """The BPE merges in rank order, each checked against vocab.json (the fast tokenizer refuses
    to load merges whose parts or result are not in the vocabulary)."""
    expected = "the CLIP BPE merges: a '#version' line, then one 'left right' pair per line"
    if not path.is_file():
        raise BundleError(f"{path}: missing; expected {expected}")
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not readable UTF-8 text ({exc}); expected {expected}") from None
    if not text:  # a header alone is fine (a bytes-only vocabulary); an empty file is a broken copy
        raise BundleError(f"{path}: empty; expected {expected}")
    lines = text.split("\n")
    # transformers' CLIPTokenizer (which the fast one is converted from) drops line 1 unseen.
    if not lines[0].startswith("#version"):
        log.warning("%s: no '#version' header; line 1 (%r) is skipped, as transformers does", path, lines[0])
    if len(lines) - 1 > CLIP_MAX_MERGES:
        log.warning("%s: %d merges; only the first %d are used, as in CLIP", path, len(lines) - 1, CLIP_MAX_MERGES)
    merges: list[tuple[str, str]] = []
    for number, line in enumerate(lines[1:CLIP_MAX_MERGES + 1], start=2):
        parts = line.split()  # as transformers: any whitespace, so CRLF files load too
        if len(parts) != 2:
            raise BundleError(f"{path}: line {number} is {line!r}; expected {expected}")
        left, right = parts
        for token in (left, right, left + right):
            if token not in vocab:
                raise BundleError(f"{path}: line {number} ({line!r}) needs {token!r}, which vocab.json lacks; "
                                  f"expected merges matching vocab.json")
        merges.append((left, right))
    return merges


def max_length_setting(config: dict[str, Any], path: Path) -> int:
    value = config.get("model_max_length")
    if value is None:
        return DEFAULT_MAX_LENGTH
    if isinstance(value, float) and value.is_integer():  # some writers turn 1e30 into a float
        value = int(value)
    if type(value) is not int or value < 2:
        raise BundleError(f"{path}: model_max_length is {value!r}; expected the text encoder's token count (77)")
    if value >= _UNSET_MAX_LENGTH:
        log.warning("%s: model_max_length %d is transformers' 'not set' value; using %d tokens",
                    path, value, DEFAULT_MAX_LENGTH)
        return DEFAULT_MAX_LENGTH
    return value


def _token_setting(value: Any, path: Path, key: str) -> tuple[str, bool | None] | None:
    """A special-token setting -- a string, or an object with "content" -- as (content, normalized)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value, None
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        normalized = value.get("normalized")
        return value["content"], normalized if isinstance(normalized, bool) else None
    raise BundleError(f"{path}: {key} is {value!r}; expected a token string or an object with 'content'")


def special_tokens(vocab: dict[str, int], vocab_path: Path, config: tuple[dict[str, Any], Path],
                    special_map: tuple[dict[str, Any], Path]) -> tuple[dict[str, str], dict[str, SpecialToken]]:
    """The bos/eos/unk/pad contents, and every token transformers would cut out of a prompt.

    The files are read as transformers reads them. tokenizer_config.json with an
    added_tokens_decoder section is the layout transformers >= 4.34 writes, and then it alone names
    the special tokens. In the older layout (the SD 1.x / 2.x releases) special_tokens_map.json
    overrides tokenizer_config.json -- that is where SD 2.x says pad = "!".
    """
    config_data, config_path = config
    specials: dict[str, SpecialToken] = {}
    section = config_data.get("added_tokens_decoder")
    if section is not None and not isinstance(section, dict):
        raise BundleError(f"{config_path}: added_tokens_decoder is {section!r}; expected an object id -> token")
    for key, token in (section or {}).items():
        parsed = _token_setting(token, config_path, f"added_tokens_decoder[{key!r}]")
        if parsed is None or not key.isdigit():
            raise BundleError(f"{config_path}: added_tokens_decoder has {key!r}: {token!r}; expected id -> token")
        # transformers' default for a special added token is normalized=False
        specials.setdefault(parsed[0], SpecialToken(parsed[0], int(key), bool(parsed[1])))
    sources = [config] if section is not None else [config, special_map]

    contents: dict[str, str] = {}
    for key, default in DEFAULT_SPECIALS.items():
        # CLIPTokenizer registers bos/eos/unk given as plain strings as normalised tokens, the pad
        # as an un-normalised one. It only changes how e.g. "<|EndOfText|>" in a prompt is read.
        content, normalized, origin = default, key != "pad_token", "the CLIP defaults"
        for data, source_path in sources:
            parsed = _token_setting(data.get(key), source_path, key)
            if parsed is not None:
                content, origin = parsed[0], source_path.name
                normalized = normalized if parsed[1] is None else parsed[1]
        contents[key] = content
        if content in specials:  # transformers reuses the added token, settings and all
            continue
        if content not in vocab:
            raise BundleError(f"{vocab_path}: has no {content!r}, the {key} that {origin} names")
        specials[content] = SpecialToken(content, vocab[content], normalized)
    for data, source_path in sources:  # none in CLIP bundles, but transformers would cut them out too
        extras = data.get("additional_special_tokens") or []
        if not isinstance(extras, list):
            raise BundleError(f"{source_path}: additional_special_tokens is {extras!r}; expected a list")
        for value in extras:
            parsed = _token_setting(value, source_path, "additional_special_tokens")
            if parsed is not None and parsed[0] not in specials and parsed[0] in vocab:
                specials[parsed[0]] = SpecialToken(parsed[0], vocab[parsed[0]], False)
    return contents, specials
