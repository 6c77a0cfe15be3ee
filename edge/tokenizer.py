"""CLIP byte-level BPE tokenizer in plain Python (no transformers, tokenizers, regex or ftfy).

It gives the ids that transformers' ``CLIPTokenizerFast`` gives when a diffusers pipeline calls it
with ``padding="max_length", max_length=77, truncation=True``: ``<start> tokens... <end>`` then the
bundle's pad token. The fast tokenizer is the reference because it is what ``AutoTokenizer``, and
so diffusers and Optimum, load for a bundle's tokenizer/ folder. Its steps, which this module
follows top to bottom:

1. special tokens written in the prompt (``<|endoftext|>``, and SD 2.x's pad token ``"!"``) are
   cut out first and map straight to their ids;
2. normalise: NFC, then lower-case character by character (the fast tokenizer also collapses
   whitespace runs, a no-op for the ids since step 3 drops whitespace);
3. pre-tokenise with ``'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+``;
4. map each piece's UTF-8 bytes to printable characters, BPE-merge them with ``</w>`` marking
   the end of the piece, and look the symbols up in vocab.json.

Where transformers' tokenizers disagree (tests/fixtures/tokenizer_reference.json marks the
prompts; ``tools/make_tokenizer_fixtures.py`` regenerates it):

* the slow ``CLIPTokenizer`` with ftfy installed runs ``ftfy.fix_text`` first: it unescapes HTML
  (``&amp;`` -> ``&``), straightens curly quotes, folds full-width forms and ligatures
  (``１２３``, ``，``, ``ﬁ``) and drops control characters. The fast tokenizer does none of this,
  so neither do we: ``&amp;`` stays the three tokens ``&``, ``amp``, ``;``.
* the slow ``CLIPTokenizer`` without ftfy puts spaces around each CJK ideograph (each becomes a
  word of its own) and deletes control and format characters, among them the zero-width joiner
  of emoji ZWJ sequences.
* both slow variants lower-case with Python's ``str.lower``, which makes a word-final capital
  sigma ``ς``; the fast tokenizer (and we) always give ``σ``.
* ``\\s`` is Unicode White_Space, as in the fast tokenizer's regex engine (Oniguruma): U+001C to
  U+001F are *not* whitespace, though Python's ``str.isspace`` says they are.
* character classes come from :mod:`unicodedata`, i.e. the running Python's Unicode version
  (14.0 on Python 3.11); the fast tokenizer's are newer (16.0). Characters assigned in between
  (rare scripts; no emoji, which are neither letters nor numbers) may split differently. Every
  character assigned in Python 3.11's Unicode was checked against tokenizers 0.22.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .bundle import read_json
from .tokenizer_files import (DEFAULT_MAX_LENGTH, END_TOKEN, SpecialToken, max_length_setting, read_merges,
                              read_vocab, special_tokens)

log = logging.getLogger(__name__)

END_OF_WORD = "</w>"
_NOT_A_MERGE = float("inf")  # rank of a pair merges.txt doesn't list
_BPE_CACHE_SIZE = 50_000  # words; the cache is emptied when full so that a daemon can't grow forever


@dataclass(frozen=True)
class Encoding:
    ids: list[int]  # exactly max_length ids: <start> tokens... <end> then pad
    dropped: int    # how many prompt tokens were cut off by truncation (0 if none)


# -- text -> words ---------------------------------------------------------------------------

def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's byte -> character table: printable bytes map to themselves, the others to U+0100 on.

    BPE runs on these characters rather than on raw bytes so that vocab.json and merges.txt stay
    printable and free of whitespace; the table's order is also the order of the first 256 ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


# bytes.decode("latin-1") turns byte b into the character U+00bb, so a str.translate with this
# table then does the whole byte -> BPE character mapping in C.
_BYTE_CHARS = bytes_to_unicode()

# Unicode White_Space: what \s means to Oniguruma. Python's \s and str.isspace() also match
# U+001C..U+001F, which the fast tokenizer keeps as punctuation.
_WHITESPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
    "\u200a\u2028\u2029\u202f\u205f\u3000")


class _ClassTable(dict):
    """str.translate table: each character -> a stand-in for its class in the CLIP pattern.

    Python's ``re`` has no ``\\p{L}`` / ``\\p{N}``, and the ``[^\\W\\d_]`` trick is wrong for
    numbers such as ``½`` or ``Ⅻ`` (``\\w`` matches them, ``\\d`` doesn't). So the text is mapped
    character for character onto stand-ins -- any letter -> ``a``, any number -> ``0``, whitespace
    -> space, anything else -> ``!`` -- and an ASCII version of the pattern runs over that. ASCII
    letters and the apostrophe stay themselves so that the contractions (``'s``, ``'ll``...)
    still see the real characters. One character maps to one, so match spans carry over to the
    text. Entries are made on first sight (``__missing__``); after that str.translate runs in C.
    """

    def __missing__(self, code_point: int) -> str:
        char = chr(code_point)
        if char in _WHITESPACE:
            stand_in = " "
        elif char == "'" or (char.isascii() and char.isalpha()):
            stand_in = char
        else:
            category = unicodedata.category(char)[0]
            stand_in = "a" if category == "L" else "0" if category == "N" else "!"
        self[code_point] = stand_in
        return stand_in


_CLASSES = _ClassTable()
# The CLIP pattern over stand-ins: a contraction, a run of letters, one number, a run of others.
_WORD = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[a-zA-Z]+|0|[!']+")


def normalize(text: str) -> str:
    """The fast tokenizer's normaliser: NFC, then lower-case one character at a time.

    ``str.lower`` is context-sensitive for one character only: it makes a capital sigma at the end
    of a word final sigma ``ς``. The fast tokenizer maps every ``Σ`` to ``σ``; so do that first.
    """
    text = unicodedata.normalize("NFC", text)
    if "Σ" in text:
        text = text.replace("Σ", "σ")
    return text.lower()


def pre_tokenize(text: str) -> list[str]:
    """Split normalised text into the words BPE runs on; whitespace separates and is dropped."""
    stand_in = text.translate(_CLASSES)
    return [text[m.start():m.end()] for m in _WORD.finditer(stand_in)]


class _SpecialMatcher:
    """Finds special tokens in text, longest first at each position (as tokenizers matches)."""

    def __init__(self, ids: dict[str, int]):
        self.ids = ids
        self.pattern = re.compile("|".join(re.escape(t) for t in sorted(ids, key=len, reverse=True)))

    def split(self, text: str) -> list[tuple[str, int | None]]:
        """(piece, None) for ordinary text and (token, id) for special tokens, in order."""
        pieces: list[tuple[str, int | None]] = []
        start = 0
        for match in self.pattern.finditer(text):
            if match.start() > start:
                pieces.append((text[start:match.start()], None))
            pieces.append((match.group(), self.ids[match.group()]))
            start = match.end()
        if start < len(text):
            pieces.append((text[start:], None))
        return pieces


# -- the tokenizer -------------------------------------------------------------------------

class ClipTokenizer:
    """CLIP BPE tokenizer of one bundle: ``encode(prompt)`` gives the text encoder's input ids."""

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *,
                 max_length: int = DEFAULT_MAX_LENGTH, bos_id: int, eos_id: int, pad_id: int, unk_id: int,
                 unk_token: str = END_TOKEN, specials: Sequence[SpecialToken] = ()):
        if max_length < 2:
            raise ValueError(f"max_length must leave room for the start and end tokens, got {max_length}")
        self.vocab = vocab
        self.max_length = max_length
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        self.unk_token = unk_token
        self._ranks: dict[tuple[str, str], int] = {}
        for rank, pair in enumerate(merges):
            self._ranks.setdefault(pair, rank)  # a repeated merge keeps its first rank
        self._cache: dict[str, tuple[tuple[str, int], ...]] = {}  # word -> its (token, id) pairs
        raw = {s.content: s.id for s in specials if not s.normalized}
        normalized = {normalize(s.content): s.id for s in specials if s.normalized}
        self._raw_specials = _SpecialMatcher(raw) if raw else None
        self._normalized_specials = _SpecialMatcher(normalized) if normalized else None

    @classmethod
    def from_dir(cls, path: Path) -> "ClipTokenizer":
        """Load a diffusers / Optimum bundle's tokenizer/ folder.

        vocab.json and merges.txt are required; tokenizer_config.json and special_tokens_map.json
        are optional (CLIP defaults: ``<|startoftext|>``; ``<|endoftext|>`` for end, pad and
        unknown; 77 tokens).
        """
        path = Path(path)
        vocab = read_vocab(path / "vocab.json")
        merges = read_merges(path / "merges.txt", vocab)
        config_path, map_path = path / "tokenizer_config.json", path / "special_tokens_map.json"
        config = read_json(config_path, "the tokenizer settings transformers writes", required=False)
        special_map = read_json(map_path, "the special tokens transformers writes", required=False)
        contents, specials = special_tokens(vocab, path / "vocab.json", (config, config_path), (special_map, map_path))
        ids = {key: specials[content].id for key, content in contents.items()}
        max_length = max_length_setting(config, config_path)
        log.debug("tokenizer %s: %d tokens, %d merges, max_length %d, pad %r (id %d)", path, len(vocab),
                  len(merges), max_length, contents["pad_token"], ids["pad_token"])
        return cls(vocab, merges, max_length=max_length, bos_id=ids["bos_token"], eos_id=ids["eos_token"],
                   pad_id=ids["pad_token"], unk_id=ids["unk_token"], unk_token=contents["unk_token"],
                   specials=list(specials.values()))

    def encode(self, text: str) -> Encoding:
        """Ids for the text encoder: start, at most max_length - 2 prompt tokens, end, then pad."""
        ids = [token_id for _, token_id in self._tokens(text)]
        room = self.max_length - 2
        dropped = max(0, len(ids) - room)
        ids = [self.bos_id, *ids[:room], self.eos_id]
        ids += [self.pad_id] * (self.max_length - len(ids))
        return Encoding(ids=ids, dropped=dropped)

    def tokenize(self, text: str) -> list[str]:
        """The prompt's tokens as vocab.json strings: no start/end/pad, not truncated."""
        return [token for token, _ in self._tokens(text)]

    def _tokens(self, text: str) -> list[tuple[str, int]]:
        tokens: list[tuple[str, int]] = []
        for piece, special_id in self._segments(_scrub_surrogates(text)):
            if special_id is not None:
                tokens.append((piece, special_id))
            else:
                for word in pre_tokenize(piece):
                    tokens.extend(self._bpe(word))
        return tokens

    def _segments(self, text: str) -> list[tuple[str, int | None]]:
        """Cut special tokens out of the text and normalise the rest, as tokenizers does.

        Un-normalised special tokens (SD 2.x's pad "!") are matched in the raw text. Each remaining
        piece is then normalised, and normalised special tokens (``<|endoftext|>``, so also
        ``<|EndOfText|>``) are matched in that. Pieces with id None still need words and BPE.
        """
        raw_pieces = self._raw_specials.split(text) if self._raw_specials else [(text, None)]
        segments: list[tuple[str, int | None]] = []
        for piece, special_id in raw_pieces:
            if special_id is not None:
                segments.append((piece, special_id))
            elif self._normalized_specials:
                segments.extend(self._normalized_specials.split(normalize(piece)))
            else:
                segments.append((normalize(piece), None))
        return segments

    def _bpe(self, word: str) -> tuple[tuple[str, int], ...]:
        """BPE-merge one word into vocab.json (token, id) pairs; results are cached."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        chars = word.encode("utf-8").decode("latin-1").translate(_BYTE_CHARS)
        symbols = [*chars[:-1], chars[-1] + END_OF_WORD]
        ranks = self._ranks
        while len(symbols) > 1:
            # Merge the adjacent pair learned first (lowest rank), every occurrence left to right,
            # until no adjacent pair is a merge. For merges learned in order (a pair's parts
            # always exist before it) this is exactly what the tokenizers library computes.
            best = min(zip(symbols, symbols[1:]), key=lambda pair: ranks.get(pair, _NOT_A_MERGE))
            if best not in ranks:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if symbols[i] == first and i + 1 < len(symbols) and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        # A symbol missing from vocab.json can only be a lone byte of a vocabulary that lacks it
        # (merges are checked against vocab.json at load); transformers makes it the unk token.
        vocab = self.vocab
        result = tuple((s, vocab[s]) if s in vocab else (self.unk_token, self.unk_id) for s in symbols)
        if len(self._cache) >= _BPE_CACHE_SIZE:
            self._cache.clear()
        self._cache[word] = result
        return result


_SURROGATE = re.compile("[\ud800-\udfff]")


def _scrub_surrogates(text: str) -> str:
    """Lone surrogates (JSON can carry "\\ud83d") can't be UTF-8 encoded: make them U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        log.warning("prompt holds unpaired UTF-16 surrogates; they are tokenized as U+FFFD")
        return _SURROGATE.sub("\ufffd", text)
