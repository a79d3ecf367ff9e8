"""A small OpenAI-compatible chat server, from the standard library only: the replaying teacher's server
(``pipeline.teacher.replay``) and the tests' endpoint; and ``HangingServer``, an endpoint that accepts
connections and never answers.

It answers ``POST /v1/chat/completions`` with a valid ``chat.completion`` (with ``usage``, and
``choices[0].logprobs.content[i].top_logprobs`` when log-probabilities are asked for), so the real ``openai``
client talks to it over HTTP: retries, timeouts and parsing are the client's own, not mocked.

Faults are injected on purpose, to show what a run survives: each request takes the next ``Fault`` from a queue
(if any), or misbehaves at random with probability ``fault_rate`` (seeded), and ``injected`` counts them by kind.
The server counts what it served: ``total`` requests, and ``successes`` (normal replies) by a hash of the
request body, so a test can tell how many times each distinct call was paid for.

>>> with OpenAIServer() as server:
...     server.base_url.startswith("http://127.0.0.1:")
True
"""

from __future__ import annotations

import collections
import hashlib
import json
import random
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

Responder = Callable[[dict[str, Any]], str]

FaultKind = Literal[
    "429",  # rate limited, with a Retry-After header
    "500",  # internal server error
    "401",  # authentication error whose body echoes the Authorization header (a careless proxy would)
    "delay",  # sleep ``delay_s`` (longer than the client timeout), then answer normally
    "truncated",  # 200 with a well-framed body that holds only the first half of the JSON
    "disconnect",  # 200 whose Content-Length promises the whole body, then the connection closes halfway
    "garbage",  # 200 with a body that is not JSON at all (``content_type`` says what it claims to be)
    "empty",  # 200, a valid completion whose content is the empty string
]

PASSAGE_MARK = re.compile(r"\[(\d+)\]")


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    retry_after: float = 0.05
    delay_s: float = 2.0
    content_type: str = "text/html"


def body_hash(body: dict[str, Any]) -> str:
    """The hash the server counts successes by: the request body as canonical JSON."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def default_responder(body: dict[str, Any]) -> str:
    """A listwise answer ``[1] > [2] > ...`` when the messages hold ``[n]`` passage marks, else ``Yes``."""
    text = " ".join(str(m.get("content") or "") for m in body.get("messages", []))
    passages = sorted({int(n) for n in PASSAGE_MARK.findall(text)})
    return " > ".join(f"[{n}]" for n in passages) if passages else "Yes"


def _logprobs(text: str, top: int) -> dict[str, Any]:
    """Deterministic log-probabilities, one entry per whitespace token of ``text``."""
    content = []
    for token in text.split() or [""]:
        alternatives = [(token, -0.1), ("No" if token == "Yes" else "Yes", -2.5), ("maybe", -4.0), ("the", -6.0)]
        content.append(
            {
                "token": token,
                "logprob": -0.1,
                "bytes": list(token.encode()),
                "top_logprobs": [
                    {"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in alternatives[: max(top, 0)]
                ],
            }
        )
    return {"content": content, "refusal": None}


def _count_words(body: dict[str, Any]) -> int:
    return sum(len(str(m.get("content") or "").split()) for m in body.get("messages", []))


class OpenAIServer:
    """``with OpenAIServer() as server:`` serves on ``server.base_url`` (``http://127.0.0.1:<port>/v1``)."""

    def __init__(
        self,
        responder: Responder = default_responder,
        latency_s: float = 0.0,
        fault_rate: float = 0.0,
        random_faults: tuple[FaultKind, ...] = ("truncated", "garbage", "500", "empty"),
        seed: int = 0,
        model: str = "test-model",
        keep_requests: bool = True,
    ) -> None:
        self.responder = responder
        self.model = model  # what GET /v1/models lists
        self.keep_requests = keep_requests  # every request body in ``requests`` (tests read them; a long run may not)
        self.latency_s = latency_s
        # besides the scripted queue: each request misbehaves with probability fault_rate, as one of random_faults
        self.fault_rate = fault_rate
        self.random_faults = random_faults
        self._random = random.Random(seed)
        self.injected: collections.Counter[str] = collections.Counter()  # faults served, by kind
        self.usable: collections.Counter[str] = collections.Counter()  # non-empty normal replies by body hash
        self.faults: collections.deque[Fault] = collections.deque()
        self.total = 0
        self.successes: collections.Counter[str] = collections.Counter()
        self.requests: list[dict[str, Any]] = []
        self.authorizations: list[str | None] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- scripting ------------------------------------------------------------------------------------------
    def inject(self, *faults: Fault | FaultKind) -> None:
        """Queue faults; each request consumes the next one (in arrival order)."""
        with self._lock:
            self.faults.extend(f if isinstance(f, Fault) else Fault(f) for f in faults)

    @property
    def served_ok(self) -> int:
        """Successful (normal) replies, over all request bodies."""
        with self._lock:
            return sum(self.successes.values())

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> OpenAIServer:
        server = self

        class Handler(_Handler):
            owner = server

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        httpd.daemon_threads = True
        httpd.block_on_close = False  # a handler sleeping in a "delay" fault must not hold up shutdown
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the server is not running")
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the reply ------------------------------------------------------------------------------------------
    def completion(self, body: dict[str, Any], content: str) -> dict[str, Any]:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": "stop",
            "logprobs": None,
        }
        if body.get("logprobs"):
            choice["logprobs"] = _logprobs(content, int(body.get("top_logprobs") or 0))
        prompt_tokens, completion_tokens = _count_words(body), len(content.split())
        return {
            "id": f"chatcmpl-{self.total}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", self.model),
            "choices": [choice],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }


class _Handler(BaseHTTPRequestHandler):
    owner: OpenAIServer
    protocol_version = "HTTP/1.0"  # one request per connection: a misbehaving reply never poisons the next

    def log_message(self, format: str, *args: Any) -> None:  # quiet test output
        pass

    def _send(self, status: int, payload: bytes, content_type: str = "application/json", **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(payload)

    def _error(self, status: int, message: str, **headers: str) -> None:
        payload = json.dumps({"error": {"message": message, "type": "server_error", "code": status}}).encode()
        self._send(status, payload, **headers)

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/models":  # what a client probes an endpoint with
            models = {"object": "list", "data": [{"id": self.owner.model, "object": "model"}]}
            self._send(200, json.dumps(models).encode())
            return
        self._error(404, f"no route {self.path}")

    def do_POST(self) -> None:
        server = self.owner
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._error(404, f"no route {self.path}")
            return
        body = json.loads(raw)
        with server._lock:
            server.total += 1
            if server.keep_requests:
                server.requests.append(body)
                server.authorizations.append(self.headers.get("Authorization"))
            fault = server.faults.popleft() if server.faults else None
            if fault is None and server.fault_rate and server._random.random() < server.fault_rate:
                fault = Fault(server._random.choice(server.random_faults), content_type="application/json")
            if fault is not None:
                server.injected[fault.kind] += 1
        if server.latency_s:
            time.sleep(server.latency_s)
        kind = fault.kind if fault else None
        if fault is not None and kind == "429":
            self._error(429, "rate limited", Retry_After=str(fault.retry_after))
            return
        if kind == "500":
            self._error(500, "internal error")
            return
        if kind == "401":
            self._error(401, f"bad credentials: {self.headers.get('Authorization')}")
            return
        if kind == "garbage":
            assert fault is not None
            self._send(200, b"<html><body>502 Bad Gateway \x00\xff</body></html>", content_type=fault.content_type)
            return
        if fault is not None and kind == "delay":
            time.sleep(fault.delay_s)
        try:
            content = "" if kind == "empty" else server.responder(body)
        except ValueError as err:  # a request the responder cannot answer: the client's error, said as such
            self._error(400, str(err))
            return
        payload = json.dumps(server.completion(body, content)).encode()
        if kind == "truncated":
            self._send(200, payload[: len(payload) // 2])
            return
        if kind == "disconnect":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        try:
            self._send(200, payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout) before the reply
            return
        if kind in (None, "empty"):  # a normal reply, paid for
            with server._lock:
                server.successes[body_hash(body)] += 1
                if kind is None:
                    server.usable[body_hash(body)] += 1


class HangingServer:
    """An endpoint that accepts connections and never answers (a hung proxy or server): the case a circuit
    breaker is for. ``connections`` counts the connections it accepted.

    >>> with HangingServer() as dead:
    ...     dead.base_url.startswith("http://127.0.0.1:")
    True
    """

    def __init__(self) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._socket.settimeout(0.1)
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self.connections = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            self.connections += 1
            self._held.append(connection)  # held open, never read from or written to

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._socket.getsockname()[1]}/v1"

    def __enter__(self) -> HangingServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for connection in self._held:
            connection.close()
        self._socket.close()
