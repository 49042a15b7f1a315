"""The OpenAI-compatible HTTP backend against a fake chat-completions server on loopback:
normal answers, a slow server (timeout then retry), 500s (retries then one error), malformed
JSON, a refused connection, the concurrency limit, and the API key never showing in logs."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from embsum.summarizer import BackendError, Item, PromptTemplate, SummarizerConfig, make_backend
from embsum.summarizer.http import chat_completions_url

SECRET = "sk-test-DO-NOT-LOG-1234"


class FakeServer:
    """`mode` picks the behaviour: ok, slow_once (first request sleeps past the client timeout),
    error (always 500), error_once, malformed (a body that is not JSON), unauthorized."""

    def __init__(self, mode: str = "ok", delay: float = 0.0):
        self.mode, self.delay = mode, delay
        self.requests: list[dict] = []
        self.auth: list[str | None] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, **body})
                    server.auth.append(self.headers.get("Authorization"))
                    n = len(server.requests)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    server.respond(self, n, body)
                finally:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def respond(self, handler, n: int, body: dict) -> None:
        time.sleep(self.delay)
        if self.mode == "slow_once" and n == 1:
            time.sleep(1.5)
        if self.mode == "error" or (self.mode == "error_once" and n == 1):
            return self._send(handler, 500, b'{"error": "boom"}')
        if self.mode == "unauthorized":
            return self._send(handler, 401, b'{"error": "bad key"}')
        if self.mode == "malformed":
            return self._send(handler, 200, b"<html>not json{")
        user = body["messages"][-1]["content"]
        answer = {"choices": [{"message": {"role": "assistant",
                                           "content": f"Enjoys quiet seaside mysteries ({user.splitlines()[1]})"}}]}
        self._send(handler, 200, json.dumps(answer).encode())

    @staticmethod
    def _send(handler, code: int, payload: bytes) -> None:
        try:
            handler.send_response(code)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(request):
    mode, delay = getattr(request, "param", ("ok", 0.0))
    s = FakeServer(mode, delay)
    yield s
    s.close()


def backend_for(url: str, monkeypatch, **kw):
    monkeypatch.setenv("TEST_LLM_KEY", SECRET)
    config = SummarizerConfig(backend="http", endpoint=url, model="fake-llm", api_key_env="TEST_LLM_KEY",
                              timeout=kw.pop("timeout", 5.0), retries=kw.pop("retries", 2),
                              backoff=kw.pop("backoff", 0.01), **kw)
    return make_backend(config)


def prompts(n: int):
    t = PromptTemplate("[system]\nBe brief.\n[user]\nItems:\n{items}")
    return [t.render([Item(f"Book {i}", "A tale.")]) for i in range(n)]


def test_url_forms():
    assert chat_completions_url("http://h:8000") == "http://h:8000/v1/chat/completions"
    assert chat_completions_url("http://h:8000/v1/") == "http://h:8000/v1/chat/completions"
    assert chat_completions_url("https://api.x/v1/chat/completions") == "https://api.x/v1/chat/completions"


def test_normal_answers_in_order_with_key_and_payload(server, monkeypatch):
    backend = backend_for(server.url, monkeypatch, max_new_tokens=20)
    out = backend.generate(prompts(5), seed=7)
    assert out == [f"Enjoys quiet seaside mysteries (- Book {i}: A tale.)" for i in range(5)]
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["model"] == "fake-llm"
    assert req["max_tokens"] == 20 and req["seed"] == 7 and req["temperature"] == 0.0
    assert req["messages"][0] == {"role": "system", "content": "Be brief."}
    assert set(server.auth) == {f"Bearer {SECRET}"}


@pytest.mark.parametrize("server", [("ok", 0.2)], indirect=True)
def test_concurrency_limit_is_respected(server, monkeypatch):
    backend = backend_for(server.url, monkeypatch, concurrency=2)
    assert len(backend.generate(prompts(6), seed=0)) == 6
    assert server.max_in_flight == 2


@pytest.mark.parametrize("server", [("slow_once", 0.0)], indirect=True)
def test_slow_answer_times_out_then_retry_succeeds(server, monkeypatch, caplog):
    backend = backend_for(server.url, monkeypatch, timeout=0.5)
    with caplog.at_level(logging.WARNING, logger="embsum.summarizer"):
        out = backend.generate(prompts(1), seed=0)
    assert out[0].startswith("Enjoys")
    assert len(server.requests) == 2
    assert "no answer within 0.5s" in caplog.text


@pytest.mark.parametrize("server", [("error_once", 0.0)], indirect=True)
def test_one_500_is_retried(server, monkeypatch):
    assert backend_for(server.url, monkeypatch).generate(prompts(1), seed=0)[0].startswith("Enjoys")
    assert len(server.requests) == 2


@pytest.mark.parametrize("server", [("error", 0.0)], indirect=True)
def test_persistent_500_retries_then_one_clear_error(server, monkeypatch, caplog):
    backend = backend_for(server.url, monkeypatch, retries=2)
    with caplog.at_level(logging.DEBUG), pytest.raises(BackendError) as err:
        backend.generate(prompts(1), seed=0)
    assert len(server.requests) == 3  # first try + 2 retries
    assert "HTTP 500" in str(err.value) and "gave up after 3 attempts" in str(err.value)
    assert SECRET not in caplog.text and SECRET not in str(err.value)


@pytest.mark.parametrize("server", [("malformed", 0.0)], indirect=True)
def test_malformed_json_is_retried_then_reported(server, monkeypatch):
    with pytest.raises(BackendError, match="malformed JSON"):
        backend_for(server.url, monkeypatch, retries=1).generate(prompts(2), seed=0)


@pytest.mark.parametrize("server", [("unauthorized", 0.0)], indirect=True)
def test_rejected_request_fails_at_once_naming_the_variable_not_the_key(server, monkeypatch):
    with pytest.raises(BackendError) as err:
        backend_for(server.url, monkeypatch, retries=3).generate(prompts(1), seed=0)
    assert len(server.requests) == 1
    assert "HTTP 401" in str(err.value) and "$TEST_LLM_KEY" in str(err.value)
    assert SECRET not in str(err.value)


def test_endpoint_down_is_one_clear_error(monkeypatch, caplog):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = backend_for(f"http://127.0.0.1:{port}", monkeypatch, retries=1)
    with caplog.at_level(logging.DEBUG), pytest.raises(BackendError) as err:
        backend.generate(prompts(3), seed=0)
    assert "cannot connect" in str(err.value) and "is the server running" in str(err.value)
    assert f"127.0.0.1:{port}" in str(err.value)
    assert SECRET not in caplog.text
