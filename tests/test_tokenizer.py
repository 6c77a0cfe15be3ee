"""edge.tokenizer against transformers' CLIPTokenizerFast (reference ids stored in fixtures).

tests/fixtures/tokenizer_reference.json and tests/fixtures/clip_tokenizer/ come from
tools/make_tokenizer_fixtures.py (dev environment); these tests need neither torch nor transformers.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from edge.errors import BundleError
from edge.tokenizer import ClipTokenizer, Encoding, normalize, pre_tokenize

FIXTURES = Path(__file__).parent / "fixtures"
VOCAB_DIR = FIXTURES / "clip_tokenizer"
REFERENCE = json.loads((FIXTURES / "tokenizer_reference.json").read_text(encoding="utf-8"))
CASES = REFERENCE["cases"]
BOS, EOS, BANG = 49406, 49407, 0  # ids of <|startoftext|>, <|endoftext|>, "!"


def copy_vocab(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(VOCAB_DIR / name, dest / name)
    return dest


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, ClipTokenizer]:
    """sd1: the fixture folder as is (pad <|endoftext|>); sd2: same vocab, SD 2.x configs (pad "!")."""
    sd2 = copy_vocab(tmp_path_factory.mktemp("sd2"))
    for name, data in REFERENCE["sd2_configs"].items():
        write_json(sd2 / name, data)
    return {"sd1": ClipTokenizer.from_dir(VOCAB_DIR), "sd2": ClipTokenizer.from_dir(sd2)}


# -- the transformers reference ----------------------------------------------------------------

def test_reference_covers_the_cases_that_matter():
    prompts = [case["prompt"] for case in CASES]
    assert len(prompts) >= 40
    assert "" in prompts
    assert any(case["dropped"]["sd1"] > 0 for case in CASES)
    assert REFERENCE["max_length"] == 77


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
@pytest.mark.parametrize("case", CASES, ids=[f"{i:02d}-{c['prompt'][:24]!r}" for i, c in enumerate(CASES)])
def test_matches_transformers_fast_tokenizer(tokenizers, case, variant):
    encoding = tokenizers[variant].encode(case["prompt"])
    assert encoding.ids == case["ids"][variant]
    assert encoding.dropped == case["dropped"][variant]


def test_special_ids_and_length(tokenizers):
    sd1, sd2 = tokenizers["sd1"], tokenizers["sd2"]
    assert (sd1.max_length, sd1.bos_id, sd1.eos_id, sd1.pad_id) == (77, BOS, EOS, EOS)
    assert (sd2.max_length, sd2.bos_id, sd2.eos_id, sd2.pad_id) == (77, BOS, EOS, BANG)
    assert sd1.encode("a photo of a cat") == Encoding(ids=[BOS, 320, 1125, 539, 320, 2368, EOS] + [EOS] * 70, dropped=0)
    assert sd2.encode("a photo of a cat").ids[6:] == [EOS] + [BANG] * 70


def test_sd2_pad_token_splits_exclamation_marks(tokenizers):
    # transformers registers the pad token "!" as a special token, so it is cut out of prompts
    # before BPE and keeps the id of "!" (0), not of "!</w>" (256) or "!!</w>".
    assert tokenizers["sd1"].tokenize("wow!!") == ["wow</w>", "!!</w>"]
    assert tokenizers["sd2"].tokenize("wow!!") == ["wow</w>", "!", "!"]
    assert tokenizers["sd2"].encode("wow!!").ids[:5] == [BOS, 2781, BANG, BANG, EOS]


def test_special_tokens_in_the_prompt(tokenizers):
    tok = tokenizers["sd1"]
    assert tok.tokenize("a <|endoftext|>b") == ["a</w>", "<|endoftext|>", "b</w>"]
    assert tok.tokenize("<|EndOfText|>") == ["<|endoftext|>"]  # matched after lower-casing
    assert tok.encode("<|startoftext|>").ids[:3] == [BOS, BOS, EOS]


# -- the stages --------------------------------------------------------------------------------

@pytest.mark.parametrize("text, words", [
    ("don't stop", ["don", "'t", "stop"]),
    ("it's ''s 'sun", ["it", "'s", "''", "s", "'s", "un"]),
    ("M3x12 2.5mm", ["m", "3", "x", "1", "2", "2", ".", "5", "mm"]),
    ("½ ² Ⅻ ③ ٣", ["½", "²", "ⅻ", "③", "٣"]),           # numbers (No, Nl, Nd), one per word
    ("straße ﬁne", ["straße", "ﬁne"]),                   # letters stay whole
    ("नमस्ते", ["नमस", "्", "त", "े"]),                    # combining marks are not letters
    ("猫咪坐在", ["猫咪坐在"]),                             # CJK: one word, no spaces needed
    ("👨\u200d👩 🏳️‍🌈!", ["👨\u200d👩", "🏳️‍🌈!"]),         # emoji and ZWJ: punctuation runs
    ("a\x1cb c\u3000d\u00a0e\u200bf", ["a", "\x1c", "b", "c", "d", "e", "\u200b", "f"]),
])
def test_pre_tokenize_unicode_classes(text, words):
    assert pre_tokenize(normalize(text)) == words


def test_normalize_nfc_and_per_character_lower_case():
    assert normalize("Cafe\u0301") == "caf\u00e9"
    assert normalize("ΟΔΟΣ") == "οδοσ"  # not str.lower()'s final sigma "οδος"
    assert normalize("İ") == "i\u0307"
    assert normalize("&amp;") == "&amp;"  # no HTML unescaping: the fast tokenizer has none


def test_bpe_cache_does_not_change_results(tokenizers):
    tok = tokenizers["sd1"]
    prompt = CASES[3]["prompt"]
    first = tok.encode(prompt)
    assert tok.encode(prompt) == first == tok.encode(prompt)


def test_lone_surrogate_is_tokenized_not_raised(tokenizers, caplog):
    with caplog.at_level(logging.WARNING, logger="edge.tokenizer"):
        assert tokenizers["sd1"].encode("cat \ud83d").ids == tokenizers["sd1"].encode("cat \ufffd").ids
    assert "surrogate" in caplog.text


# -- truncation --------------------------------------------------------------------------------

def test_truncation_keeps_the_end_token_and_counts_dropped(tokenizers):
    tok = tokenizers["sd1"]
    prompt = " ".join(f"word{i}" for i in range(60))  # "word", "1", "2" ...: well over 75 tokens
    tokens = tok.tokenize(prompt)
    encoding = tok.encode(prompt)
    assert len(encoding.ids) == 77
    assert encoding.ids[0] == BOS and encoding.ids[-1] == EOS
    assert encoding.ids[1:76] == [tok.vocab[t] for t in tokens[:75]]
    assert encoding.dropped == len(tokens) - 75 > 0


@pytest.mark.parametrize("count, dropped", [(74, 0), (75, 0), (76, 1), (80, 5)])
def test_truncation_boundary(tokenizers, count, dropped):
    encoding = tokenizers["sd2"].encode("cat " * count)
    assert encoding.dropped == dropped
    assert encoding.ids[0] == BOS and len(encoding.ids) == 77
    content = min(count, 75)
    assert encoding.ids[1:1 + content] == [2368] * content
    assert encoding.ids[1 + content] == EOS
    assert encoding.ids[2 + content:] == [BANG] * (75 - content)


# -- a tiny vocabulary: fallbacks when merges run out ------------------------------------------

TINY_VOCAB = {"a": 0, "b": 1, "c": 2, "a</w>": 3, "b</w>": 4, "c</w>": 5, "ab": 6, "abc</w>": 7, "bc</w>": 8,
              "<|startoftext|>": 9, "<|endoftext|>": 10}
TINY_MERGES = "#version: 0.2\na b\nb c</w>\nab c</w>\n"


@pytest.fixture
def tiny(tmp_path) -> ClipTokenizer:
    write_json(tmp_path / "vocab.json", TINY_VOCAB)
    (tmp_path / "merges.txt").write_text(TINY_MERGES, encoding="utf-8")
    write_json(tmp_path / "tokenizer_config.json", {"model_max_length": 8})
    return ClipTokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("text, tokens, ids", [  # checked against CLIPTokenizerFast
    ("abc", ["abc</w>"], [7]),
    ("bc", ["bc</w>"], [8]),
    ("ABAB", ["ab", "a", "b</w>"], [6, 0, 4]),         # no "ab ab</w>" merge: falls back to pieces
    ("cab", ["c", "a", "b</w>"], [2, 0, 4]),           # no merge applies at all: single bytes
    ("dab", ["<|endoftext|>", "a", "b</w>"], [10, 0, 4]),  # byte missing from vocab: unk token
    ("x!", ["<|endoftext|>", "<|endoftext|>"], [10, 10]),
])
def test_tiny_vocab_fallbacks(tiny, text, tokens, ids):
    assert tiny.tokenize(text) == tokens
    assert tiny.encode(text) == Encoding(ids=[9, *ids, 10] + [10] * (6 - len(ids)), dropped=0)


def test_tiny_vocab_truncates_to_model_max_length(tiny):
    assert tiny.max_length == 8
    assert tiny.encode("abab abab abab") == Encoding(ids=[9, 6, 0, 4, 6, 0, 4, 10], dropped=3)


# -- bundle files: defaults and errors ---------------------------------------------------------

def test_config_files_are_optional(tmp_path):
    tok = ClipTokenizer.from_dir(copy_vocab(tmp_path))
    assert (tok.max_length, tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (77, BOS, EOS, EOS, EOS)


@pytest.mark.parametrize("pad", ["!", {"content": "!", "normalized": False, "special": True}])
def test_pad_token_string_or_object(tmp_path, pad):
    folder = copy_vocab(tmp_path)
    write_json(folder / "tokenizer_config.json", {"model_max_length": 77, "pad_token": pad})
    assert ClipTokenizer.from_dir(folder).pad_id == BANG


def test_modern_tokenizer_config_wins_over_special_tokens_map(tmp_path):
    # With added_tokens_decoder (transformers >= 4.34 layout) special_tokens_map.json is not read.
    folder = copy_vocab(tmp_path)
    config = json.loads((VOCAB_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))
    write_json(folder / "tokenizer_config.json", config)
    write_json(folder / "special_tokens_map.json", {"pad_token": "!"})
    assert ClipTokenizer.from_dir(folder).pad_id == EOS


def test_unset_model_max_length_means_77(tmp_path, caplog):
    folder = copy_vocab(tmp_path)
    write_json(folder / "tokenizer_config.json", {"model_max_length": 1000000000000000019884624838656})
    with caplog.at_level(logging.WARNING, logger="edge.tokenizer"):
        assert ClipTokenizer.from_dir(folder).max_length == 77
    assert "model_max_length" in caplog.text


@pytest.mark.parametrize("name", ["vocab.json", "merges.txt"])
def test_missing_file_is_named(tmp_path, name):
    folder = copy_vocab(tmp_path)
    (folder / name).unlink()
    with pytest.raises(BundleError, match=rf"{name}: missing; expected the CLIP BPE"):
        ClipTokenizer.from_dir(folder)


@pytest.mark.parametrize("content, expected", [
    ("{not json", r"vocab.json: not valid JSON .*expected the CLIP BPE vocabulary"),
    ('["a", "b"]', r"vocab.json: holds a JSON list; expected the CLIP BPE vocabulary"),
    ("{}", r"vocab.json: empty; expected"),
    ('{"a": "zero"}', r"vocab.json: token 'a' has id 'zero'"),
    (b"\xff\xfe{}", r"vocab.json: not valid JSON"),
])
def test_malformed_vocab_is_named(tmp_path, content, expected):
    folder = copy_vocab(tmp_path)
    path = folder / "vocab.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(BundleError, match=expected):
        ClipTokenizer.from_dir(folder)


@pytest.mark.parametrize("content, expected", [
    ("", r"merges.txt: empty; expected the CLIP BPE merges"),
    ("#version: 0.2\ni n\nthis has three\n", r"merges.txt: line 3 is 'this has three'; expected the CLIP BPE"),
    ("#version: 0.2\ni n\nq \u2603\n", r"merges.txt: line 3 \('q \u2603'\) needs '\u2603', which vocab.json lacks"),
])
def test_malformed_merges_is_named(tmp_path, content, expected):
    folder = copy_vocab(tmp_path)
    (folder / "merges.txt").write_text(content, encoding="utf-8")
    with pytest.raises(BundleError, match=expected):
        ClipTokenizer.from_dir(folder)


def test_header_only_merges_gives_byte_tokens(tmp_path):
    folder = copy_vocab(tmp_path)
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    assert ClipTokenizer.from_dir(folder).tokenize("cat") == ["c", "a", "t</w>"]


@pytest.mark.parametrize("config, expected", [
    ({"model_max_length": "77"}, r"tokenizer_config.json: model_max_length is '77'"),
    ({"pad_token": ["!"]}, r"tokenizer_config.json: pad_token is \['!'\]"),
    ({"pad_token": "<pad>"}, r"vocab.json: has no '<pad>', the pad_token that tokenizer_config.json names"),
])
def test_malformed_config_is_named(tmp_path, config, expected):
    folder = copy_vocab(tmp_path)
    write_json(folder / "tokenizer_config.json", config)
    with pytest.raises(BundleError, match=expected):
        ClipTokenizer.from_dir(folder)


def test_malformed_optional_json_is_named(tmp_path):
    folder = copy_vocab(tmp_path)
    (folder / "special_tokens_map.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(BundleError, match=r"special_tokens_map.json: holds a JSON list"):
        ClipTokenizer.from_dir(folder)


def test_a_prompt_the_model_cannot_read_is_named():
    from edge.bundle import load_bundle
    from edge.vocabulary import known_words, prompt_warning
    small = ClipTokenizer.from_dir(load_bundle().tokenizer_dir)
    warning = prompt_warning(small, "a cat on a sofa", "knolling-tiny")
    assert warning and "unknown: cat, sofa" in warning and "gears" in warning and "hite" not in warning
    assert prompt_warning(small, "knolling of 3 red gears, high quality studio photo", "knolling-tiny") is None
    assert {"gear", "red", "knolling", "exploded", "white"} <= set(known_words(small))
    clip = ClipTokenizer.from_dir(VOCAB_DIR)  # every English word is a CLIP token
    assert prompt_warning(clip, "a cat on a sofa", "sd") is None
