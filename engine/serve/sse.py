"""Server-sent events that stop the generation when the client goes away.

SSEResponse sends `data: <json>\\n\\n` events from an async iterator and ends with `data: [DONE]`.
While it streams it also listens for the client's disconnect; on disconnect (or when a send
fails) it calls `on_disconnect` at once (the route passes Run.cancel), so the request's place in
the batch is freed at the next decode step rather than when its next token would be sent.
"""
from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator, Callable

from starlette.responses import Response


def event(data) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n".encode()


DONE = b"data: [DONE]\n\n"


class SSEResponse(Response):
    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], on_disconnect: Callable[[], None]):
        self.status_code = 200
        self.background = None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]
        self.events = events
        self.on_disconnect = on_disconnect

    async def __call__(self, scope, receive, send) -> None:
        gone = asyncio.Event()

        async def watch():
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone.set()
                    self.on_disconnect()
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.events:
                if gone.is_set():
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if not gone.is_set():
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:                      # the connection broke under a send
            self.on_disconnect()
        finally:
            watcher.cancel()
            await self.events.aclose()
