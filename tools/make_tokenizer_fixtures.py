"""Build the CLIP tokenizer test fixtures (dev-time only: needs transformers, tokenizers, ftfy, open_clip).

    PYTHONPATH=. /work/devenv/bin/python tools/make_tokenizer_fixtures.py

writes

* ``tests/fixtures/clip_tokenizer/``: the standard CLIP vocab.json + merges.txt (built from
  open_clip's ``bpe_simple_vocab_16e6.txt.gz`` exactly as OpenAI CLIP builds its encoder) with an
  SD 1.x style tokenizer_config.json / special_tokens_map.json (pad token ``<|endoftext|>``);
* ``tests/fixtures/tokenizer_reference.json``: for every prompt in :data:`PROMPTS`, the ids that
  transformers' ``CLIPTokenizerFast`` gives with ``padding="max_length", max_length=77,
  truncation=True`` (what diffusers pipelines call) for an SD 1.x bundle (pad ``<|endoftext|>``)
  and an SD 2.x bundle (pad ``"!"``), the number of prompt tokens truncation dropped, and which
  slow-tokenizer variants (with / without ftfy) disagree with the fast one. The SD 2.x tokenizer
  config files are stored in the reference file too, so the tests can rebuild that bundle.

The fast tokenizer is the reference because it is what ``AutoTokenizer`` (and so diffusers) loads
for a bundle's tokenizer/ folder. ``edge.tokenizer`` is checked against it at the end when it can
be imported; a mismatch makes the script exit non-zero.

:func:`write_clip_vocab` is importable (``tools/make_tiny_bundle.py`` uses it): it writes the full
vocabulary or a smaller one built from the first ``n_merges`` merges, for tiny test models.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
MAX_LENGTH = 77
CLIP_MERGES = 49152 - 256 - 2  # OpenAI CLIP: 49152 BPE entries = 256 bytes + merges + 2 specials
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP / GPT-2 byte -> printable character table (the order fixes the vocab ids)."""
    # Deliberately not imported from edge.tokenizer: the fixtures must not depend on the code under test.
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def open_clip_bpe_path() -> Path:
    """open_clip's copy of OpenAI's merges file, found without importing open_clip (that imports torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("open_clip is not installed (pip install --no-deps open_clip_torch): it ships the BPE file")
    return Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"


def clip_vocab(n_merges: int | None = None) -> tuple[dict[str, int], list[str]]:
    """The encoder and merges of OpenAI CLIP's SimpleTokenizer, optionally cut to the first n merges."""
    lines = gzip.open(open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1:CLIP_MERGES + 1]  # line 0 is a "#version" header
    if n_merges is not None:
        if not 0 <= n_merges <= CLIP_MERGES:
            raise ValueError(f"n_merges must be in 0..{CLIP_MERGES}, got {n_merges}")
        merges = merges[:n_merges]
    byte_symbols = list(bytes_to_unicode().values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols]
    vocab += ["".join(m.split()) for m in merges]
    vocab += [BOS, EOS]
    encoder = dict(zip(vocab, range(len(vocab))))
    assert len(encoder) == len(vocab), "duplicate vocabulary entries"
    return encoder, merges


def _added_token(content: str) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def sd1_configs(vocab: dict[str, int], pad_token: str = EOS,
                model_max_length: int = MAX_LENGTH) -> dict[str, dict[str, Any]]:
    """tokenizer_config.json + special_tokens_map.json as transformers 4.x ``save_pretrained`` writes them."""
    config = {
        "added_tokens_decoder": {str(vocab[t]): dict(_added_token(t), special=True) for t in (BOS, EOS)},
        "bos_token": BOS, "clean_up_tokenization_spaces": False, "do_lower_case": True, "eos_token": EOS,
        "errors": "replace", "model_max_length": model_max_length, "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer", "unk_token": EOS,
    }
    special = {"bos_token": _added_token(BOS), "eos_token": _added_token(EOS),
               "pad_token": _added_token(pad_token) if pad_token in (BOS, EOS) else pad_token,
               "unk_token": _added_token(EOS)}
    return {"tokenizer_config.json": config, "special_tokens_map.json": special}


def sd2_configs() -> dict[str, dict[str, Any]]:
    """The older (pre added_tokens_decoder) layout stabilityai/stable-diffusion-2-* ship.

    tokenizer_config.json says pad ``<|endoftext|>`` but special_tokens_map.json says ``"!"``;
    transformers lets special_tokens_map.json win for this layout, so these bundles pad with "!".
    """
    legacy = {f"{name}_token": dict(_added_token(t), __type="AddedToken")
              for name, t in (("bos", BOS), ("eos", EOS), ("unk", EOS))}
    config = {"add_prefix_space": False, "do_lower_case": True, "errors": "replace",
              "model_max_length": MAX_LENGTH, "pad_token": EOS, "tokenizer_class": "CLIPTokenizer", **legacy}
    special = {"bos_token": _added_token(BOS), "eos_token": _added_token(EOS), "pad_token": "!",
               "unk_token": _added_token(EOS)}
    return {"tokenizer_config.json": config, "special_tokens_map.json": special}


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_clip_vocab(dest_dir: Path | str, n_merges: int | None = None, pad_token: str = EOS,
                     model_max_length: int = MAX_LENGTH) -> Path:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json into dest_dir.

    ``n_merges=None`` gives the standard 49408-entry CLIP vocabulary; a number keeps only the
    first n merges (vocab: 512 byte symbols + n merge results + 2 specials, so the special ids
    become 512 + n and 513 + n), for tiny test models. The config files are the SD 1.x layout;
    pass ``pad_token="!"`` for an SD 2.x style pad.
    """
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab(n_merges)
    (dest / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (dest / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    for name, data in sd1_configs(vocab, pad_token, model_max_length).items():
        _write_json(dest / name, data)
    return dest


# Prompts the fixtures cover: product-shot prompts (the product's use), then the corner cases of
# each tokenizer stage (cleanup, pre-tokenizer classes, byte-level BPE, special tokens, truncation).
LONG_PROMPT = (
    "knolling photography of a fully disassembled vintage film camera, every screw, spring, gear, lens "
    "element and shutter blade laid out in neat rows on a matte grey background, top-down view, soft "
    "diffuse studio lighting, high detail, sharp focus, 8k, product catalogue style, orderly grid, "
    "labels in small sans-serif type, color-coded trays, macro lens, f/8, no shadows"
)
PROMPTS: list[str] = [
    "",
    "a photo of a cat",
    "knolling of a disassembled mechanical keyboard, flat lay, neatly arranged parts on white background",
    "Exploded view of a DSLR camera, technical illustration, every component labeled, isometric, blueprint",
    "exploded-view diagram: M3x12 screws, M2.5 standoffs, 18650 Li-ion cells (3.7V, 2500mAh) & a 5V/3A USB-C board",
    "knolling, Raspberry Pi 5 + NVMe HAT + 27W PSU; M2.5x6 nylon spacers x4, 40-pin GPIO header",
    "1920x1080, 3.14159, 2024-05-17, 007, 100%, -40°C, #ff00aa, v2.1.0, 1e-3",
    "½ cup, x² + y², ③ ⅻ Ⅻ, ٣ ۴ ५, １２３ ＡＢＣ",
    "don't, can't, won't, it's, we're, they've, I'm, you'll, he'd, y'all's",
    "DON'T IT'S WE'RE THEY'VE I'M YOU'LL HE'D",
    "rock'n'roll, o'clock's, '''quoted''', 'sup, ''s, tis', it’s (curly)",
    "multiple   spaces\tand\ttabs\nand\nnewlines\r\n\r\nend  ",
    "   \t\n  ",
    "salt &amp; pepper &lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#39;apos&#39; &nbsp;&eacute;",
    "Tom &amp; Jerry",
    "Café crème brûlée à la française, naïve façade, Ångström, São Paulo, Ærøskøbing",
    "Cafe\u0301 cre\u0300me bru\u0302le\u0301e (decomposed accents)",
    "Straße, Fußgängerübergang, GROẞBUCHSTABEN, Maß, STRASSE",
    "ΟΔΟΣ ΠΡΟΣ ΤΗΝ ΑΚΡΟΠΟΛΗ, Σ, σοφός, ΣΟΦΟΣ",
    "İstanbul, ǅemal ǈubljana, ﬁne ﬂower, K (Kelvin), Ω (Ohm)",
    "一只可爱的猫咪坐在窗台上，阳光明媚，高清摄影",
    "東京の夜景、ネオン、雨、シネマティック、８Ｋ",
    "서울의 밤거리, 네온사인, 비 오는 날",
    "Кот в сапогах, масляная живопись, ВЫСОКОЕ КАЧЕСТВО, ёлка",
    "قطة لطيفة تجلس على النافذة، ٢٠٢٤",
    "नमस्ते दुनिया, สวัสดีครับ, שלום עולם",
    "cat猫кошка🐈chat",
    "a cute cat 🐱 with sunglasses 😎🔥🔥 and a ❤️",
    "family 👨‍👩‍👧‍👦, technologist 👩🏽‍💻, rainbow flag 🏳️‍🌈, 👍🏻👍🏿",
    "flags 🇺🇸🇯🇵🇩🇪🇺🇦 and keycaps 1️⃣ #️⃣",
    "!!! ??? ... --- *** ((masterpiece)), [best quality], {highres}, <lora:foo:0.8>, a|b|c",
    "~`@#$%^&_=+\\/ (red:1.3) (blue:0.7) snake_case_word __init__",
    "wow!! amazing!!!, isn't it?! yes! 'hello!'",
    "“smart quotes” and ‘single’ – en dash — em dash … ellipsis",
    "https://example.com/path?q=1&x=2#frag user@example.org",
    "E=mc² ∑ ∞ ≠ √2 π ≈ 3.14",
    "a\x1cb\x1fc\x00d\u200be\ufeff f\u00a0g\u3000h\u2028i\x85j\x0bk",
    "a <|endoftext|> b <|startoftext|> c",
    "<|ENDOFTEXT|> upper-case special, <|endoftext|><|endoftext|>",
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, "
    "worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry",
    LONG_PROMPT,
    LONG_PROMPT + " " + LONG_PROMPT,
    "a " * 75,   # exactly 75 prompt tokens: fills the window, nothing dropped
    "a " * 76,   # one too many
    "a! " * 40,  # SD 2.x's "!" pad token splits these differently
    "🐱🔥👨‍👩‍👧 " * 20,  # long emoji prompt: several byte tokens per emoji
    "猫" * 120,  # one long CJK "word" (no spaces)
]


def _load_transformers():
    import transformers
    from transformers import AutoTokenizer, CLIPTokenizer, CLIPTokenizerFast
    transformers.logging.set_verbosity_error()
    return transformers, AutoTokenizer, CLIPTokenizer, CLIPTokenizerFast


def _slow_without_ftfy(CLIPTokenizer, folder: Path):
    """CLIPTokenizer as it runs where ftfy is not installed (its BasicTokenizer fallback)."""
    saved = sys.modules.get("ftfy")
    sys.modules["ftfy"] = None  # makes `import ftfy` raise ImportError
    try:
        tok = CLIPTokenizer.from_pretrained(folder)
    finally:
        if saved is None:
            del sys.modules["ftfy"]
        else:
            sys.modules["ftfy"] = saved
    assert tok.fix_text is None
    return tok


def _ids(tok, prompt: str) -> tuple[list[int], int]:
    """What a diffusers pipeline feeds the text encoder, and how many prompt tokens it dropped."""
    ids = tok(prompt, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids
    full = tok(prompt, padding="longest").input_ids
    return list(ids), max(0, len(full) - MAX_LENGTH)


def build_reference(vocab_dir: Path) -> dict[str, Any]:
    transformers, AutoTokenizer, CLIPTokenizer, CLIPTokenizerFast = _load_transformers()
    import tokenizers
    with tempfile.TemporaryDirectory() as tmp:
        sd2_dir = Path(tmp) / "sd2"
        sd2_dir.mkdir()
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(vocab_dir / name, sd2_dir / name)
        for name, data in sd2_configs().items():
            _write_json(sd2_dir / name, data)
        variants = {}
        for key, folder, pad in (("sd1", vocab_dir, EOS), ("sd2", sd2_dir, "!")):
            fast = AutoTokenizer.from_pretrained(folder)
            assert isinstance(fast, CLIPTokenizerFast) and fast.pad_token == pad, (key, type(fast), fast.pad_token)
            assert fast.model_max_length == MAX_LENGTH
            direct = CLIPTokenizerFast(str(vocab_dir / "vocab.json"), str(vocab_dir / "merges.txt"), pad_token=pad)
            variants[key] = {"fast": fast, "direct": direct,
                             "slow_ftfy": CLIPTokenizer.from_pretrained(folder),
                             "slow_plain": _slow_without_ftfy(CLIPTokenizer, folder)}
        cases = []
        for prompt in PROMPTS:
            case: dict[str, Any] = {"prompt": prompt, "ids": {}, "dropped": {}, "slow_differs": []}
            for key, toks in variants.items():
                ids, dropped = _ids(toks["fast"], prompt)
                assert _ids(toks["direct"], prompt) == (ids, dropped), (key, prompt)
                case["ids"][key], case["dropped"][key] = ids, dropped
                for slow in ("slow_ftfy", "slow_plain"):
                    if _ids(toks[slow], prompt)[0] != ids and slow not in case["slow_differs"]:
                        case["slow_differs"].append(slow)
            cases.append(case)
    return {
        "about": "CLIPTokenizerFast ids, padding='max_length', max_length=77, truncation=True; "
                 "sd1: pad <|endoftext|> (tests/fixtures/clip_tokenizer), sd2: pad '!' (configs below). "
                 "slow_differs: CLIPTokenizer variants (with ftfy / without) giving other ids.",
        "generator": "tools/make_tokenizer_fixtures.py",
        "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
        "max_length": MAX_LENGTH,
        "sd2_configs": sd2_configs(),
        "cases": cases,
    }


def write_reference(path: Path, reference: dict[str, Any]) -> None:
    """JSON with one line per case, so diffs of the fixture stay readable."""
    head = {k: v for k, v in reference.items() if k != "cases"}
    text = json.dumps(head, indent=1, ensure_ascii=False)[:-2]
    lines = [json.dumps(case, ensure_ascii=False) for case in reference["cases"]]
    path.write_text(text + ',\n "cases": [\n  ' + ",\n  ".join(lines) + "\n ]\n}\n", encoding="utf-8")
    assert json.loads(path.read_text(encoding="utf-8")) == reference


def check_edge_tokenizer(vocab_dir: Path, reference: dict[str, Any]) -> int:
    """Compare edge.tokenizer with the reference; returns the number of mismatches."""
    sys.path.insert(0, str(ROOT))
    try:
        from edge.tokenizer import ClipTokenizer
    except ImportError as exc:
        print(f"edge.tokenizer not importable ({exc}); skipping the check")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        sd2_dir = Path(tmp)
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(vocab_dir / name, sd2_dir / name)
        for name, data in reference["sd2_configs"].items():
            _write_json(sd2_dir / name, data)
        toks = {"sd1": ClipTokenizer.from_dir(vocab_dir), "sd2": ClipTokenizer.from_dir(sd2_dir)}
    bad = 0
    for case in reference["cases"]:
        for key, tok in toks.items():
            enc = tok.encode(case["prompt"])
            if enc.ids != case["ids"][key] or enc.dropped != case["dropped"][key]:
                bad += 1
                print(f"MISMATCH {key} {case['prompt']!r}\n  edge {enc.ids} dropped {enc.dropped}\n"
                      f"  ref  {case['ids'][key]} dropped {case['dropped'][key]}")
    return bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=FIXTURES, help="fixtures folder (default: tests/fixtures)")
    args = parser.parse_args()
    vocab_dir = write_clip_vocab(args.out / "clip_tokenizer")
    reference = build_reference(vocab_dir)
    ref_path = args.out / "tokenizer_reference.json"
    write_reference(ref_path, reference)
    print(f"wrote {vocab_dir} and {ref_path}: {len(reference['cases'])} prompts")
    for case in reference["cases"]:
        if case["slow_differs"]:
            print(f"  slow != fast ({', '.join(case['slow_differs'])}): {case['prompt'][:70]!r}")
    if check_edge_tokenizer(vocab_dir, reference):
        sys.exit("edge.tokenizer disagrees with the reference")


if __name__ == "__main__":
    main()
