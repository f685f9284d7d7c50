"""A minimal keep-alive HTTP/1.1 client on h11, for the control client's long-polls.

One request at a time per connection; a connection whose exchange did not
end cleanly (timeout, cancel, protocol error) is closed, never reused.
"""
from __future__ import annotations

import asyncio
from typing import Callable

import h11

CONNECT_TIMEOUT_S = 5.0
MAX_RESPONSE_BYTES = 64 << 20
_READ_CHUNK = 64 << 10


class Unavailable(Exception):
    """The server could not be reached or answered outside HTTP; the message says how."""


class HttpConnection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._h11: h11.Connection | None = None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = self._h11 = None

    async def post(self, path: str, body: bytes, timeout: float,
                   on_sent: Callable[[], None] | None = None) -> tuple[int, bytes]:
        """(status, body). Raises Unavailable; the connection is closed on any failure.

        ``on_sent`` runs once the request is written: for a long-poll that
        the server holds, that is the only sign the server is there.
        """
        try:
            # asyncio.timeout in this task, not nested wait_for: on 3.11 a
            # cancel racing a failed connect left a task whose error nobody read.
            async with asyncio.timeout(timeout):
                return await self._exchange(path, body, on_sent)
        except TimeoutError:
            self.close()
            raise Unavailable(f"no answer within {timeout:.0f}s") from None
        except (OSError, h11.ProtocolError, asyncio.IncompleteReadError) as exc:
            self.close()
            raise Unavailable(str(exc) or type(exc).__name__) from None
        except BaseException:  # cancelled mid-exchange: the stream state is unknown
            self.close()
            raise

    async def _exchange(self, path: str, body: bytes, on_sent: Callable[[], None] | None) -> tuple[int, bytes]:
        if self._writer is None:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
            self._h11 = h11.Connection(h11.CLIENT)
        conn = self._h11
        request = h11.Request(method="POST", target=path, headers=[
            ("Host", f"{self.host}:{self.port}"), ("Content-Type", "application/json"),
            ("Content-Length", str(len(body)))])
        self._writer.write(conn.send(request) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        await self._writer.drain()
        if on_sent is not None:
            on_sent()
        status, chunks, size = 0, [], 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await self._reader.read(_READ_CHUNK)
                if not data and conn.their_state is not h11.DONE:
                    raise OSError("the server closed the connection")
                conn.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_RESPONSE_BYTES:
                    raise OSError(f"response larger than {MAX_RESPONSE_BYTES} bytes")
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise OSError("the server closed the connection")
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:
            self.close()
        return status, b"".join(chunks)
