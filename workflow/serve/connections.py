"""The connection deadline uvicorn lacks: how long a client may take to send its request headers.

uvicorn (0.54, h11) arms no timer on a fresh connection, and cancels its keep-alive timer on any byte received, so
a client that connects and sends nothing, or sends its headers a byte at a time, or trickles the rest of a body the
gateway refused without reading, holds a connection (and counts against limit_concurrency) for ever. This
protocol arms a timer when the connection opens and again when an answer is complete, and disarms it only when a
request's headers have all arrived (uvicorn starts a new request cycle); when it fires the connection is closed.
The body's own deadline is the guard's (workflow.serve.guard), which can answer 408.

Like nginx's client_header_timeout and Apache's mod_reqtimeout header=, in the protocol uvicorn runs.
"""

from __future__ import annotations

from collections.abc import Callable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderDeadline(H11Protocol):
    header_s: float = 10.0
    """Set by with_header_deadline."""
    on_timeout: Callable[[], None] = staticmethod(lambda: None)
    """Called for every connection closed by the deadline (the gateway's metrics count them)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.header_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:  # a request's headers arrived: uvicorn made its request cycle
            self._disarm()

    def on_response_complete(self) -> None:
        cycle = self.cycle
        super().on_response_complete()  # may start a pipelined request, which makes a new cycle
        if self.cycle is cycle and not self.transport.is_closing():
            self._arm()

    def _arm(self) -> None:
        self._disarm()
        self.header_timer = self.loop.call_later(self.header_s, self._expired)

    def _disarm(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _expired(self) -> None:
        self.header_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return
        self.on_timeout()
        try:
            self.conn.send(h11.ConnectionClosed())
        except h11.LocalProtocolError:
            pass
        self.transport.close()


def with_header_deadline(seconds: float, on_timeout: Callable[[], None]) -> type[HeaderDeadline]:
    """The protocol class for uvicorn.Config(http=...): headers must arrive within `seconds`."""
    return type("GatewayHTTP", (HeaderDeadline,), {"header_s": seconds, "on_timeout": staticmethod(on_timeout)})
