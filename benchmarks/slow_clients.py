"""Clients that misbehave on purpose, over raw TLS sockets: what a slowloris attacker, a stalled uploader or an impatient
user does to the gateway. Each returns what the gateway did to it. Used by benchmarks/soak.py and the gateway's
attack tests (tests/test_serve_guard.py).

    silent          TLS handshake, then nothing
    trickle         a request line and headers one byte at a time, never finished
    idle_body       complete headers announcing a body (Content-Length), then nothing; with or without a key
    aborted_stream  a streaming completion, dropped (TCP reset) after its first event
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from workflow.serve.tls import client_context


@dataclass
class Outcome:
    kind: str
    status: int | None = None
    """The answer's HTTP status, None when none came."""
    answered_s: float | None = None
    """Seconds from sending the request (or connecting) to the whole answer."""
    closed_s: float | None = None
    """Seconds from connecting to the gateway closing the connection; None when still open at give_up."""
    body: bytes = b""
    error: str | None = None
    """A client-side failure before the misbehaviour began (connect, handshake)."""


def connect(port: int, ca: str | Path, timeout: float = 30.0) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return client_context(ca).wrap_socket(raw, server_hostname="127.0.0.1")


def request_head(method: str, path: str, key: str | None, length: int | None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _wait_for_close(sock: ssl.SSLSocket, began: float, give_up: float, outcome: Outcome, buffer: bytearray) -> None:
    """Read until the gateway closes the connection (or give_up seconds after began); keep the first answer."""
    while True:
        left = began + give_up - time.monotonic()
        if left <= 0:
            return
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return
        except (ssl.SSLError, OSError):
            chunk = b""
        if not chunk:
            outcome.closed_s = time.monotonic() - began
            return
        buffer += chunk
        if outcome.status is None and b"\r\n\r\n" in buffer:
            head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
            if len(rest) >= length:
                outcome.status = int(head.split(b" ", 2)[1])
                outcome.body, outcome.answered_s = rest[:length], time.monotonic() - began


def silent(port: int, ca: str | Path, give_up: float) -> Outcome:
    outcome, began = Outcome("silent"), time.monotonic()
    try:
        sock = connect(port, ca)
    except OSError as err:
        return Outcome("silent", error=repr(err))
    with sock:
        _wait_for_close(sock, began, give_up, outcome, bytearray())
    return outcome


def trickle(port: int, ca: str | Path, give_up: float, every: float = 0.25) -> Outcome:
    outcome, began = Outcome("trickle"), time.monotonic()
    try:
        sock = connect(port, ca)
    except OSError as err:
        return Outcome("trickle", error=repr(err))
    head = request_head("POST", "/v1/chat/completions", None, 10)[:-4] + b"\r\nX-Padding: " + b"a" * 100_000
    with sock:
        for byte in head:
            if time.monotonic() - began > give_up:
                return outcome
            try:
                sock.sendall(bytes([byte]))
            except (ssl.SSLError, OSError):
                outcome.closed_s = time.monotonic() - began
                return outcome
            sock.settimeout(every)
            try:
                if sock.recv(65536) == b"":
                    outcome.closed_s = time.monotonic() - began
                    return outcome
            except TimeoutError:
                continue
            except (ssl.SSLError, OSError):
                outcome.closed_s = time.monotonic() - began
                return outcome
    return outcome


def idle_body(port: int, ca: str | Path, give_up: float, key: str | None) -> Outcome:
    """Headers of a chat completion announcing a 1000-byte body, then nothing."""
    outcome = Outcome("idle_body_key" if key else "idle_body_nokey")
    began = time.monotonic()
    try:
        sock = connect(port, ca)
        sock.sendall(request_head("POST", "/v1/chat/completions", key, 1000))
    except OSError as err:
        return Outcome(outcome.kind, error=repr(err))
    with sock:
        _wait_for_close(sock, began, give_up, outcome, bytearray())
    return outcome


def aborted_stream(port: int, ca: str | Path, key: str, model: str, max_tokens: int = 64) -> Outcome:
    """A streaming chat completion, reset by the client after its first event (status 200 expected first)."""
    outcome, began = Outcome("aborted_stream"), time.monotonic()
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Count to twenty."}], "max_tokens": max_tokens,
                       "stream": True}).encode()
    try:
        sock = connect(port, ca)
        sock.sendall(request_head("POST", "/v1/chat/completions", key, len(body)) + body)
        sock.settimeout(60)
        buffer = b""
        while b"data: " not in buffer.partition(b"\r\n\r\n")[2]:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buffer += chunk
        outcome.status = int(buffer.split(b" ", 2)[1]) if buffer.startswith(b"HTTP/1.1 ") else None
        outcome.answered_s = time.monotonic() - began
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset, mid-stream
        sock.close()
    except OSError as err:
        outcome.error = repr(err)
    return outcome
