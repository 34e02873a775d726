"""uvicorn's HTTP protocol with a deadline on each request's line and headers, which uvicorn itself lacks.

uvicorn times an idle keep-alive connection only after a first response: a client that opens connections and sends
half a request line holds each socket for ever. Here every request's headers must be complete within
`header_timeout`, counted from the connection (or from the request's first byte on a kept-alive one); otherwise the
server answers 408 and closes. A response sent before its request's body has all arrived (a 404, a 401, /health
with a body that never ends) closes the connection too: uvicorn would otherwise keep it open with no timer at all.
`python api.py` runs uvicorn with it (--http protocol:HeaderDeadlineProtocol).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serve_config import ServeConfig

TIMEOUT_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
               b"content-length: 55\r\n\r\n"
               b'{"detail":"the request headers did not arrive in time"}')


class HeaderDeadlineProtocol(HttpToolsProtocol):
    header_timeout: float | None = None  # read once per process, at the first connection

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        if HeaderDeadlineProtocol.header_timeout is None:
            HeaderDeadlineProtocol.header_timeout = ServeConfig.from_env().header_timeout_s
        self.header_deadline: asyncio.TimerHandle | None = None
        self.arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.header_deadline is None:  # the next request on a kept-alive connection (the first is timed already)
            self.arm()

    def on_headers_complete(self) -> None:
        self.disarm()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        if self.cycle is not None and self.cycle.more_body and not self.transport.is_closing():
            self.transport.close()  # the body never finished: nothing would time this connection out
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm()
        super().connection_lost(exc)

    def arm(self) -> None:
        self.disarm()
        self.header_deadline = self.loop.call_later(self.header_timeout, self.headers_late)

    def disarm(self) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
            self.header_deadline = None

    def headers_late(self) -> None:
        self.header_deadline = None
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # a pipelined request is late, the one before still runs: close after it
            return
        if not self.transport.is_closing():
            self.transport.write(TIMEOUT_408)
            self.transport.close()
