"""A webhook endpoint on 127.0.0.1 for push tests: it verifies signatures and responds as a script sets."""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from telemetry.webhooks import InvalidSignature, verify


@dataclass(frozen=True)
class Answer:
    """The response to one request: status, extra headers, and a pause before sending it."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass(frozen=True)
class Delivery:
    """One request as the receiver saw it."""

    received_at: float
    headers: dict[str, str]
    body: dict[str, Any]
    signature_valid: bool
    status: int

    @property
    def message_ids(self) -> list[str]:
        return [message["id"] for message in self.body["messages"]]


class WebhookReceiver:
    """Serves ``POST /hook``. ``script`` sets the responses to the first requests in order, and ``default`` the rest.

    ``secrets`` verify the Standard Webhooks signature of every request; a request
    with an invalid signature gets 401 whatever the script sets.
    """

    def __init__(self, *, default: Answer = Answer()) -> None:
        self.default = default
        self.script: deque[Answer] = deque()
        self.secrets: list[str] = []
        self.deliveries: list[Delivery] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self.port = int(self._server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05})

    def __enter__(self) -> "WebhookReceiver":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def answered(self, status: int) -> list[Delivery]:
        with self._lock:
            return [d for d in self.deliveries if d.status == status]

    def delivered_ids(self) -> list[str]:
        """Return the message ids of every request that got a 2xx response, with repeats."""
        with self._lock:
            return [i for d in self.deliveries if 200 <= d.status < 300 for i in d.message_ids]

    def _next_answer(self) -> Answer:
        with self._lock:
            return self.script.popleft() if self.script else self.default

    def _record(self, delivery: Delivery) -> None:
        with self._lock:
            self.deliveries.append(delivery)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the name http.server dispatches to
                length = int(self.headers.get("content-length", "0"))
                raw = self.rfile.read(length)
                headers = {key.lower(): value for key, value in self.headers.items()}
                try:
                    verify(receiver.secrets, headers, raw, now=time.time())
                    valid = True
                except InvalidSignature:
                    valid = False
                answer = receiver._next_answer() if valid else Answer(401)
                receiver._record(Delivery(time.monotonic(), headers, json.loads(raw), valid, answer.status))
                if answer.delay_s:
                    time.sleep(answer.delay_s)
                try:
                    self.send_response(answer.status)
                    for name, value in answer.headers.items():
                        self.send_header(name, value)
                    self.send_header("content-length", "0")
                    self.end_headers()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # The queue timed out and closed the connection.

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler
