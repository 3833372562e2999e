"""Prompt text normalization: the one rule by which the vocabulary, the text table and the runtime's
cache agree that two spellings are the same prompt."""
from __future__ import annotations

import re
import string

_ARTICLES = {"the", "a", "an"}
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation.replace(chr(39), ''))}]")


def normalize_prompt(text: str) -> str:
    """Lowercase, drop apostrophes, turn other punctuation into spaces, drop articles, collapse spaces.

    ``"The patient's LEFT lung!"`` -> ``"patients left lung"``; ``"K-wire"`` -> ``"k wire"``.
    """
    if not isinstance(text, str):
        raise TypeError(f"prompt must be a string, got {type(text).__name__}")
    text = text.lower().replace("'", "").replace("\u2019", "")
    text = _PUNCTUATION.sub(" ", text)
    return " ".join(word for word in text.split() if word not in _ARTICLES)
