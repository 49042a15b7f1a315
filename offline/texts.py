"""The text a model reads for an item (EVAL.md): `"{title}. {description}"`."""

from __future__ import annotations


def item_text(title: str | None, description: str | None) -> str:
    """Exactly `"{title}. {description}"` (the goodreads-v1 template, kept literal so figures
    stay comparable); a missing or blank part is left out instead of leaving a stray ". "."""
    title = (title or "").strip()
    description = (description or "").strip()
    if title and description:
        return f"{title}. {description}"
    return title or description
