"""LLM user-interest summaries: prompt template, generating backends, output checks.

Storage-free: the job that picks users and writes the catalog is offline/summarize.py.
"""

from embsum.summarizer.backends import Backend, BackendError, make_backend
from embsum.summarizer.checks import check_summary, clean_summary
from embsum.summarizer.config import SummarizerConfig
from embsum.summarizer.prompt import Item, Prompt, PromptTemplate

__all__ = ["Backend", "BackendError", "Item", "Prompt", "PromptTemplate", "SummarizerConfig",
           "check_summary", "clean_summary", "make_backend"]
