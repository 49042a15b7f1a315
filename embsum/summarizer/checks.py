"""Output checks: an LLM summary is only a training target when it says something.

Three failures seen with small models: nothing (empty or only punctuation), rambling past any
summary length (over-long), and echo-only output that lists the input titles back instead of
describing interests. Each check returns a reason string, or None for a usable summary.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
# Words that carry no interest on their own: English function words plus the filler a summary
# wraps titles in ("the reader enjoys books like ..."). An output made of titles and these is echo.
STOPWORDS = frozenset(["a", "about", "above", "after", "again", "all", "also", "an", "and", "any", "are", "as", "at", "be", "because", "been", "being", "both", "but", "by", "can", "could", "did", "do", "does", "each", "either", "for", "from", "had", "has", "have", "he", "her", "here", "hers", "him", "his", "how", "i", "if", "in", "into", "is", "it", "its", "itself", "just", "like", "likes", "may", "me", "more", "most", "my", "no", "nor", "not", "of", "on", "one", "or", "other", "our", "out", "over", "own", "she", "so", "some", "such", "than", "that", "the", "their", "them", "then", "there", "these", "they", "this", "those", "through", "to", "too", "two", "under", "up", "very", "was", "we", "were", "what", "when", "which", "while", "who", "whom", "why", "will", "with", "would", "you", "your", "reader", "readers", "reading", "read", "reads", "enjoy", "enjoys", "enjoyed", "enjoying", "interest", "interests", "interested", "book", "books", "novel", "novels", "story", "stories", "title", "titles", "series", "user", "users", "person", "prefers", "prefer", "seems", "appears", "likely", "particularly", "especially", "include", "includes", "including", "such", "various"])
_PREFIX = re.compile(r"^\s*(summary|interests?|answer|assistant)\s*:\s*", re.IGNORECASE)


def content_words(text: str) -> list[str]:
    return [w for w in (m.lower() for m in _WORD.findall(text)) if w not in STOPWORDS and not w.isdigit()]


def clean_summary(text: str | None) -> str:
    """Strip the wrappers models add ("Summary:", quotes, blank lines) and a sentence cut off by
    the token limit when a complete one comes before it."""
    text = " ".join((text or "").split())
    text = _PREFIX.sub("", text).strip().strip('"').strip()
    if text and text[-1] not in ".!?\"')":
        end = max(text.rfind(". "), text.rfind("! "), text.rfind("? "))
        if end > 0:
            text = text[: end + 1]
    return text


def echo_fraction(summary: str, titles: Sequence[str]) -> float:
    """Share of the summary's content words that are not words of the input titles (1.0: all new)."""
    words = content_words(summary)
    if not words:
        return 0.0
    title_words = {w for t in titles for w in content_words(t or "")}
    return sum(w not in title_words for w in words) / len(words)


def check_summary(summary: str | None, titles: Sequence[str], max_words: int = 90,
                  min_novel_fraction: float = 0.3) -> str | None:
    """None when usable, else the reason: 'empty', 'over-long (N words)' or 'echo-only (...)'."""
    text = (summary or "").strip()
    if not _WORD.search(text):
        return "empty"
    n_words = len(text.split())
    if n_words > max_words:
        return f"over-long ({n_words} words > {max_words})"
    if not content_words(text):
        return "empty (no content words)"
    novel = echo_fraction(text, titles)
    if novel < min_novel_fraction:
        return f"echo-only ({novel:.0%} of its content words are not from the titles)"
    return None
