"""A bounded HTTP GET server on a running event loop: connections, time limits, framing. HTTP ONLY.

One GET per connection (`Connection: close`); the answer comes from an async handler
`(path, accept) -> (status, content type, body)`. Waiting for a client costs a socket, never a
thread. At most MAX_CONNECTIONS at once (a new one drops the oldest that has not sent its request,
else the oldest); CLIENT_SECONDS to send the request (at most HEAD_LIMIT bytes of head) and as many
to take the answer. A client's misbehaviour (a reset, a timeout, garbage) closes its connection
silently.
"""
# If the wrapper crashes, the workload MUST continue.
# If we are unsure, DO LESS.
# If something is not reversible, DO NOT TOUCH IT.
# This is governance, not execution.

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from urllib.parse import urlsplit

from .errors import FfrtmpError, UsageError

MAX_CONNECTIONS = 256
CLIENT_SECONDS = 10  # to send the request, then again to take the answer
HEAD_LIMIT = 8192
Handler = Callable[[str, str], Awaitable[tuple[int, str, bytes]]]


def parse_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--listen: expected HOST:PORT, e.g. 127.0.0.1:9464, got {listen!r}")
    return host, int(port)


class Server:
    """Listening on (host, port) once `start` returned; `close` stops it and drops every connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.conns: dict[asyncio.StreamWriter, bool] = {}  # oldest first; True once its request is in
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        try:
            self.server = await asyncio.start_server(
                self._serve, host, port, limit=HEAD_LIMIT, backlog=socket.SOMAXCONN, reuse_address=True
            )
        except OSError as err:
            raise FfrtmpError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.conns[writer] = False
        if len(self.conns) > MAX_CONNECTIONS:
            oldest = next((w for w, busy in self.conns.items() if not busy), next(iter(self.conns)))
            del self.conns[oldest]
            oldest.transport.abort()
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CLIENT_SECONDS)
            self.conns[writer] = True
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ")
            fields = dict(ln.partition(":")[::2] for ln in lines[1:] if ln)
            accept = next((v.strip() for k, v in fields.items() if k.lower() == "accept"), "")
            if method == "GET":
                code, ctype, body = await self.handler(urlsplit(target).path, accept)
            else:
                code, ctype, body = 405, "text/plain", b"only GET\n"
            status = f"HTTP/1.1 {code} {HTTPStatus(code).phrase}\r\nContent-Type: {ctype}\r\n"
            writer.write(f"{status}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), CLIENT_SECONDS)
        except (OSError, EOFError, ValueError, TimeoutError, asyncio.LimitOverrunError):
            pass  # the client's doing: its connection is closed, nothing else
        finally:
            self.conns.pop(writer, None)
            writer.transport.abort()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for w in list(self.conns):
            w.transport.abort()
