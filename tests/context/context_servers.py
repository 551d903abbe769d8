"""Loopback peers for the API-client tests: `transformers serve` and a fault-injecting proxy.

The proxy forwards OpenAI-style requests to the real server and, per request number,
can answer 429, 500, hang past the client's timeout, cut the body short, send garbage
JSON, or silently cut the prompt (a server that truncates context).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

SERVE_START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def save_tiny_model(directory: Path) -> Path:
    from lmlab.models import tiny_model

    lm = tiny_model()
    lm.model.save_pretrained(directory)
    lm.tokenizer.save_pretrained(directory)
    return directory


class ServedModel:
    """`transformers serve <dir>` on 127.0.0.1, stopped by :meth:`stop`."""

    def __init__(self, model_dir: Path, log: Path) -> None:
        self.model_dir = model_dir
        self.port = free_port()
        exe = Path(sys.executable).with_name("transformers")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self._log = open(log, "wb")
        self.process = subprocess.Popen(
            [str(exe), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(self.port),
             "--device", "cpu"], stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self._wait_healthy(log)

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _wait_healthy(self, log: Path) -> None:
        deadline = time.monotonic() + SERVE_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"transformers serve exited: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError("transformers serve did not become healthy in time")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()


Action = str  # ok, 400, 429, 500, hang, cut, garbage, empty, truncate:<chars>


class FaultProxy:
    """A threaded HTTP proxy on 127.0.0.1 that misbehaves on chosen request numbers."""

    def __init__(self, upstream: str, plan: Callable[[int], Action] = lambda n: "ok",
                 delay_s: float = 0.0, hang_s: float = 3.0) -> None:
        self.upstream = upstream.rstrip("/")
        self.plan = plan
        self.delay_s = delay_s
        self.hang_s = hang_s
        self.lock = threading.Lock()
        self.count = 0
        self.actions: list[Action] = []
        self.auth_headers: list[str] = []
        self.forwarded_prompts: list[str] = []
        self.inflight = 0
        self.max_inflight = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server API
                proxy.handle(self)

            def do_GET(self) -> None:  # noqa: N802
                proxy.forward(self, b"")

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        with self.lock:
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            self._handle(handler)
        finally:
            with self.lock:
                self.inflight -= 1

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        body = handler.rfile.read(int(handler.headers.get("Content-Length", 0)))
        with self.lock:
            self.count += 1
            action = self.plan(self.count)
            self.actions.append(action)
            self.auth_headers.append(handler.headers.get("Authorization", ""))
        if self.delay_s:
            time.sleep(self.delay_s)
        if action in ("400", "429", "500"):
            payload = json.dumps({"error": {"message": f"injected {action}", "type": "injected"}}).encode()
            self._reply(handler, int(action), payload)
        elif action == "hang":
            time.sleep(self.hang_s)
            handler.close_connection = True
        elif action == "garbage":
            self._reply(handler, 200, b"{not json at all")
        elif action == "empty":
            self._reply(handler, 200, b"")
        elif action == "cut":
            full = self._upstream(handler, body)[1]
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(full)))
            handler.end_headers()
            handler.wfile.write(full[: len(full) // 2])
            handler.wfile.flush()
            handler.close_connection = True
        else:
            if action.startswith("truncate:"):
                body = self._truncate(body, int(action.split(":")[1]))
            self.forward(handler, body)

    @staticmethod
    def _truncate(body: bytes, keep_chars: int) -> bytes:
        request = json.loads(body)
        for message in request["messages"]:
            if message["role"] == "user":
                message["content"] = message["content"][-keep_chars:]
        return json.dumps(request).encode()

    def _upstream(self, handler: BaseHTTPRequestHandler, body: bytes) -> tuple[int, bytes]:
        request = urllib.request.Request(self._target(handler.path), data=body or None,
                                         method=handler.command,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def _target(self, path: str) -> str:
        base = self.upstream.removesuffix("/v1")
        return base + path

    def forward(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        status, payload = self._upstream(handler, body)
        if status == 200 and body:
            with self.lock:
                self.forwarded_prompts.append(json.loads(body)["messages"][-1]["content"])
        self._reply(handler, status, payload)

    @staticmethod
    def _reply(handler: BaseHTTPRequestHandler, status: int, payload: bytes) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)
