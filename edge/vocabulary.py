"""Which words a model knows, from its tokenizer's vocabulary, and a warning for prompts it cannot read.

A CLIP vocabulary has a whole-word token for almost every English word. A model trained on a small
vocabulary of its own (the embedded knolling-tiny: parts, colours, counts, layouts) has whole-word
tokens only for the words of its training captions; any other word is split into fragments the
model never learned to read, and a prompt made mostly of them draws blobs. Saying so beats an image
that silently ignores the prompt.
"""

from __future__ import annotations

from .tokenizer import END_OF_WORD, ClipTokenizer, normalize, pre_tokenize


def _words(text: str) -> list[str]:
    """The prompt's words that could carry meaning: two or more letters."""
    return [w for w in pre_tokenize(normalize(text)) if len(w) > 1 and w.isascii() and w.isalpha()]


def known_words(tokenizer: ClipTokenizer) -> list[str]:
    """The content words of the vocabulary, to show a user: whole-word tokens of three or more
    letters, without BPE's fragments that are the end of another word ("hite" of "white")."""
    whole = {t[: -len(END_OF_WORD)] for t in tokenizer.vocab if t.endswith(END_OF_WORD)}
    whole = {w for w in whole if len(w) > 2 and w.isascii() and w.isalpha() and w == w.lower()}
    endings = {w[i:] for w in whole for i in range(1, len(w))}  # linear in the vocabulary (49k tokens for CLIP)
    return sorted(whole - endings)


def unknown_words(tokenizer: ClipTokenizer, prompt: str) -> tuple[list[str], int]:
    """(the prompt's words with no whole-word token, how many words it has), each word once."""
    words = list(dict.fromkeys(_words(prompt)))
    return [w for w in words if w + END_OF_WORD not in tokenizer.vocab], len(words)


def prompt_warning(tokenizer: ClipTokenizer, prompt: str, model: str) -> str | None:
    """A warning when most words of ``prompt`` are unknown to the model, else None."""
    unknown, total = unknown_words(tokenizer, prompt)
    if not unknown or 2 * len(unknown) <= total:
        return None
    known = known_words(tokenizer)
    listed = ", ".join(known[:40]) + (", ..." if len(known) > 40 else "")
    return (f"prompt: most of its words are unknown to {model} and will be ignored (unknown: {', '.join(unknown)}); "
            f"this model knows: {listed}")
