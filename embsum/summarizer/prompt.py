"""The summary prompt: a template file with a system and a user message, the user's items
rendered into it and cut to a token budget.

Why a budget: histories can be long (MIND users click dozens of news) and descriptions vary, so
the items block gets a fixed number of tokens. Lines share it water-filling style (short lines
keep their full text, long ones are cut to the same cap); when even `min_item_tokens` per line
does not fit, the oldest items are left out, since the newest say most about current interests.

The prompt hash covers everything that changes the rendered text (template text, budget, line
format), so editing the prompt re-summarizes every user on the next run, and nothing else does.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Protocol

# Bump when the code's rendering of an item line changes (it is part of the prompt hash).
LINE_FORMAT = "v1: - {title}: {description}, cut lines end in …"
_SECTION = re.compile(r"^\[(system|user)\]\s*$")


class TokenCounter(Protocol):
    def count(self, text: str) -> int: ...

    def truncate(self, text: str, max_tokens: int) -> str: ...


class WordPieceCounter:
    """Tokenizer-free estimate (words and punctuation marks), for backends without a local
    tokenizer (http, import) and for tests. Close to a BPE count for English prose."""

    _token = re.compile(r"\w+|[^\w\s]")

    def count(self, text: str) -> int:
        return len(self._token.findall(text))

    def truncate(self, text: str, max_tokens: int) -> str:
        if max_tokens <= 0:
            return ""
        for i, m in enumerate(self._token.finditer(text)):
            if i == max_tokens:
                return text[: m.start()].rstrip()
        return text


class TokenizerCounter:
    """Counts with a Hugging Face tokenizer (the model's own tokens)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def truncate(self, text: str, max_tokens: int) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_tokens:
            return text
        return self.tokenizer.decode(ids[: max(max_tokens, 0)], skip_special_tokens=True).rstrip()


@dataclass(frozen=True)
class Item:
    title: str
    description: str = ""


@dataclass(frozen=True)
class Prompt:
    """One rendered prompt: the chat messages, and the titles the echo check compares against."""

    system: str
    user: str
    titles: tuple[str, ...]

    def messages(self) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": self.user}]

    def plain(self) -> str:
        """For models without a chat template (T5, BART): system and user text in one string."""
        return f"{self.system}\n\n{self.user}" if self.system else self.user


def default_prompt_path() -> Path:
    return Path(str(resources.files("embsum").joinpath("prompts", "summary.txt")))


def fit_caps(lengths: Sequence[int], budget: int) -> int:
    """The largest per-line cap with sum(min(length, cap)) <= budget (water-filling)."""
    lo, hi = 0, max(lengths, default=0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(n, mid) for n in lengths) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


class PromptTemplate:
    def __init__(self, text: str, item_token_budget: int = 320, min_item_tokens: int = 12):
        self.text = text
        self.item_token_budget = item_token_budget
        self.min_item_tokens = min_item_tokens
        self.system, self.user = self._parse(text)
        self.hash = hashlib.sha1(
            "\x1f".join([text, str(item_token_budget), str(min_item_tokens), LINE_FORMAT]).encode()
        ).hexdigest()

    @classmethod
    def load(cls, path: str | Path | None = None, **kwargs) -> PromptTemplate:
        """The template file at `path`, or the packaged default."""
        path = Path(path) if path else default_prompt_path()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise ValueError(f"cannot read prompt template {path}: {err.strerror}") from None
        return cls(text, **kwargs)

    @staticmethod
    def _parse(text: str) -> tuple[str, str]:
        sections: dict[str, list[str]] = {}
        current = "user"  # a file without section headers is one user message
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            m = _SECTION.match(line)
            if m:
                current = m.group(1)
                sections[current] = []
            else:
                sections.setdefault(current, []).append(line)
        system = "\n".join(sections.get("system", [])).strip()
        user = "\n".join(sections.get("user", [])).strip()
        if "{items}" not in user:
            raise ValueError("prompt template: the [user] message must contain the {items} placeholder")
        return system, user

    def item_lines(self, items: Sequence[Item], counter: TokenCounter) -> list[str]:
        """One `- title: description` line per item, oldest first, within the token budget."""
        max_items = max(1, self.item_token_budget // self.min_item_tokens)
        items = list(items)[-max_items:]  # keep the newest
        lines = [f"- {it.title.strip()}: {it.description.strip()}" if it.description and it.description.strip()
                 else f"- {it.title.strip()}" for it in items]
        lengths = [counter.count(line) for line in lines]
        cap = fit_caps(lengths, self.item_token_budget)
        # A cut line ends in "…" (one token of the cap), so the model sees the text goes on.
        return [line if n <= cap else counter.truncate(line, max(cap - 1, 1)) + "…" for line, n in zip(lines, lengths)]

    def render(self, items: Sequence[Item], counter: TokenCounter | None = None) -> Prompt:
        counter = counter or WordPieceCounter()
        lines = self.item_lines(items, counter)
        # str.replace, not str.format: titles and descriptions contain braces.
        # {n_items} first: a title could itself contain the text "{n_items}".
        user = self.user.replace("{n_items}", str(len(lines))).replace("{items}", "\n".join(lines))
        system = self.system.replace("{n_items}", str(len(lines)))
        return Prompt(system=system, user=user, titles=tuple(it.title for it in items))
