"""Single timed HTTP round trips over a kept-open connection, with ``http.client``.

The 4M-element cells time one request of 48 MB in and 32 MB out at a time. On
the 2-core reference machine httpx added 60-70 ms to each of those round trips
(the raw-bytes echo: 225 ms with httpx, 154 ms with a plain socket, min of 7),
the same for every server, which hid the servers' own differences. The standard
library's client sends the body with one ``sendall`` and reads a Content-Length
answer with one ``readinto`` loop, so what is timed is the server.
"""

from __future__ import annotations

import http.client
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

# What a failed round trip raises: timeouts are OSErrors too (socket.timeout).
ERRORS = (OSError, http.client.HTTPException)


@dataclass
class Reply:
    status_code: int
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


class Client:
    """POSTs to any ``http://host:port/path``, one kept-open connection per server."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._connections: dict[str, http.client.HTTPConnection] = {}

    def _connection(self, netloc: str) -> http.client.HTTPConnection:
        connection = self._connections.get(netloc)
        if connection is None:
            connection = http.client.HTTPConnection(netloc, timeout=self.timeout_s)
            connection.connect()
            # Headers and body go in two sends (below): no Nagle delay between them.
            assert connection.sock is not None
            connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._connections[netloc] = connection
        return connection

    def post(self, url: str, content: bytes, headers: dict[str, str]) -> Reply:
        parts = urlsplit(url)
        connection = self._connection(parts.netloc)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        try:
            # A memoryview body is sent as it is; bytes would first be copied onto the
            # headers (http.client joins them to save a send).
            connection.request("POST", path, body=memoryview(content), headers=headers)
            response = connection.getresponse()
            reply = Reply(response.status, response.read())
        except ERRORS:
            self._drop(parts.netloc)
            raise
        if response.will_close:
            self._drop(parts.netloc)
        return reply

    def _drop(self, netloc: str) -> None:
        connection = self._connections.pop(netloc, None)
        if connection is not None:
            connection.close()

    def close(self) -> None:
        for netloc in list(self._connections):
            self._drop(netloc)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
