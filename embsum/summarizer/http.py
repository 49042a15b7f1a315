"""OpenAI-compatible chat completions over HTTP (vLLM, TGI, llama.cpp server, hosted APIs),
with the standard library only.

Transient failures (timeouts, refused connections, 429, 5xx, a body that is not the expected
JSON) are retried with exponential backoff; a request the server rejects outright (other 4xx)
fails at once. After the last retry the whole call fails with one line naming the endpoint and
the last error. The API key is read from the environment variable named in the config and only
ever placed in the Authorization header: it is never logged nor put into an error message.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from embsum.summarizer.backends import Backend, BackendError, model_label
from embsum.summarizer.config import SummarizerConfig
from embsum.summarizer.prompt import Prompt

log = logging.getLogger("embsum.summarizer")


class _Retryable(Exception):
    pass


def chat_completions_url(endpoint: str) -> str:
    """Accept `http://host:8000`, `.../v1` or the full `.../v1/chat/completions`."""
    url = endpoint.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


class HTTPBackend(Backend):
    name = "http"

    def __init__(self, config: SummarizerConfig):
        self.config = config
        self.model_id = model_label(config)
        self.url = chat_completions_url(config.endpoint)
        if not self.url.startswith(("http://", "https://")):
            raise BackendError(f"endpoint must be an http:// or https:// URL, got {config.endpoint!r}")
        self._api_key = os.environ.get(config.api_key_env) or None
        if self._api_key is None:
            log.info("no API key in $%s: sending requests without Authorization", config.api_key_env)
        self._failed = threading.Event()

    def _request(self, payload: dict) -> str:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        req = urllib.request.Request(self.url, data=json.dumps(payload).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.config.timeout) as resp:
                body = resp.read()
        except urllib.error.HTTPError as err:
            detail = err.read(300).decode("utf-8", "replace").strip()
            msg = f"HTTP {err.code}" + (f": {detail}" if detail else "")
            if err.code == 429 or err.code >= 500:
                raise _Retryable(msg) from None
            if err.code in (401, 403):
                msg += f" (check the key in ${self.config.api_key_env})"
            raise BackendError(f"{self.url} rejected the request: {msg}") from None
        except TimeoutError:
            raise _Retryable(f"no answer within {self.config.timeout:g}s") from None
        except urllib.error.URLError as err:
            reason = err.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise _Retryable(f"no answer within {self.config.timeout:g}s") from None
            raise _Retryable(f"cannot connect ({reason}); is the server running?") from None
        except (ConnectionError, OSError) as err:  # reset mid-response, remote closed...
            raise _Retryable(f"connection failed ({err})") from None
        try:
            data = json.loads(body)
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Retryable(f"malformed JSON answer: {body[:120].decode('utf-8', 'replace')!r}") from None
        return content if isinstance(content, str) else ""

    def _one(self, prompt: Prompt, seed: int, temperature: float) -> str:
        cfg = self.config
        payload = {"model": cfg.model, "messages": prompt.messages(), "max_tokens": cfg.max_new_tokens,
                   "temperature": temperature, "seed": seed}
        if temperature > 0:
            payload["top_p"] = cfg.top_p
        last = ""
        for attempt in range(cfg.retries + 1):
            if self._failed.is_set():  # another request of this call already gave up
                raise BackendError("cancelled")
            try:
                return self._request(payload)
            except _Retryable as err:
                last = str(err)
                if attempt < cfg.retries:
                    delay = cfg.backoff * 2 ** attempt
                    log.warning("%s: %s; retry %d/%d in %.1fs", self.url, last, attempt + 1, cfg.retries, delay)
                    time.sleep(delay)
        self._failed.set()
        raise BackendError(f"{self.url}: {last} (gave up after {cfg.retries + 1} attempts)")

    def generate(self, prompts: Sequence[Prompt], seed: int, temperature: float = 0.0) -> list[str]:
        self._failed.clear()
        with ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
            futures = [pool.submit(self._one, p, seed, temperature) for p in prompts]
            try:
                return [f.result() for f in futures]
            except BackendError:
                self._failed.set()
                for f in futures:
                    f.cancel()
                # The first real error, not a "cancelled" of a request that stopped because of it.
                errors = [f.exception() for f in futures if f.done() and not f.cancelled() and f.exception()]
                real = [e for e in errors if str(e) != "cancelled"]
                raise (real or errors)[0] from None
