"""What uvicorn does not bound: how long a connection may wait before its request headers are complete.

uvicorn (0.54, h11) arms no timer on a fresh connection and cancels its keep-alive timer on any byte received, so a
client that connects and sends nothing, sends its headers a byte at a time, or trickles the rest of a body the
gateway refused without reading, holds a connection for ever; and every open connection counts against
limit_concurrency (rollout.gateway.max_connections), past which each new request gets 503. This protocol

- arms a timer when the connection opens and again when an answer is complete, and disarms it only when a request's
  headers have all arrived (uvicorn starts a new request cycle); when it fires the connection is closed
  (nginx's client_header_timeout, Apache's mod_reqtimeout header=);
- keeps the table below limit_concurrency: when a new connection (or bytes on a waiting one) would fill it, closes
  the connection that has waited longest for its headers, as nginx reuses idle connections when it runs out. A
  well-formed client sends its headers within milliseconds of its handshake or of its previous answer, so the
  connections closed are the slow ones (or long-idle keep-alive ones), and those that wait cannot starve those
  that ask. Only when every connection is busy with a request does uvicorn answer 503;
- closes those connections at once, without waiting for the client's TLS close_notify (as nginx does after a
  timeout), and gives a connection the server closed after an answer (408, Connection: close) CLOSE_GRACE_S to
  finish before dropping it: asyncio would otherwise hold it, and its slot, for 30 s waiting on a client that
  does not read.

The body's deadline is the guard's (workflow.serve.guard), which answers 408; slow bodies need a key, so a key's
rate limit bounds how many it can hold.
"""

from __future__ import annotations

from collections.abc import Callable

from uvicorn.protocols.http.h11_impl import H11Protocol

CLOSE_GRACE_S = 2.0


class HeaderDeadline(H11Protocol):
    header_s: float = 10.0
    on_close: Callable[[str], None] = staticmethod(lambda reason: None)
    """Called with "header_timeout" or "evicted" for every connection this closes (the gateway's metrics count them)."""
    on_refused: Callable[[str], None] = staticmethod(lambda peer: None)
    """Called with the client's address for every request uvicorn itself answers 400 (the gateway audits it)."""
    waiting: dict[HeaderDeadline, None]
    """This server's connections waiting for request headers, longest-waiting first; one per class
    (with_header_deadline makes a class per server)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.header_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()
        self._make_room()

    def _make_room(self) -> None:
        """uvicorn answers 503 to a request while len(connections) >= limit_concurrency (closing ones included): close
        the connections that have waited longest for their headers until this one fits."""
        if self.limit_concurrency is None or len(self.connections) < self.limit_concurrency:
            return
        excess = len(self.connections) - (self.limit_concurrency - 1)
        for oldest in list(self.waiting):
            if excess <= 0:
                break
            if oldest is not self and not oldest.transport.is_closing():
                oldest._close("evicted")
                excess -= 1

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes h11 refuses (a malformed request line or header, two different Content-Lengths,
        two Transfer-Encodings): sent, then reported to on_refused so that it is audited like any refusal."""
        super().send_400_response(msg)
        self.on_refused(self.client[0] if self.client else "0.0.0.0")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        if self in self.waiting:  # these bytes may complete a request's headers: make room for it first
            self._make_room()
        super().data_received(data)
        if self.cycle is not cycle:  # a request's headers arrived: uvicorn made its request cycle
            self._disarm()

    def on_response_complete(self) -> None:
        cycle = self.cycle
        super().on_response_complete()  # may start a pipelined request, which makes a new cycle
        if self.transport.is_closing():
            self.loop.call_later(CLOSE_GRACE_S, self._drop)
        elif self.cycle is cycle:
            self._arm()

    def _drop(self) -> None:
        if self in self.connections:  # still there: the client has not finished the TLS shutdown
            self.transport.abort()

    def _arm(self) -> None:
        self._disarm()
        self.header_timer = self.loop.call_later(self.header_s, self._close, "header_timeout")
        self.waiting[self] = None

    def _disarm(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None
        self.waiting.pop(self, None)

    def _close(self, reason: str) -> None:
        self._disarm()
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return
        self.on_close(reason)
        self.transport.abort()
        self.connections.discard(self)  # its slot is free now, not when asyncio reports the loss (connection_lost)


def with_header_deadline(seconds: float, on_close: Callable[[str], None],
                         on_refused: Callable[[str], None]) -> type[HeaderDeadline]:
    """The protocol class for one server's uvicorn.Config(http=...): headers must arrive within `seconds`."""
    return type("GatewayHTTP", (HeaderDeadline,), {"header_s": seconds, "on_close": staticmethod(on_close),
                                                    "on_refused": staticmethod(on_refused), "waiting": {}})
