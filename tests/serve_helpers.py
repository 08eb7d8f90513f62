"""Helpers of the server tests: a server on 127.0.0.1 in a thread of the test process (so tests
can read the model's live counts), and the request bodies the tests send."""
from __future__ import annotations

import base64
import socket
import threading
import time

import pytest


def require_server_libs():
    """Skip (with the reason in pytest's summary) when the serve / test extras are missing."""
    for name in ("fastapi", "uvicorn", "multipart", "httpx"):
        pytest.importorskip(name, reason=f"{name} is missing: pip install -e '.[test]' (the server tests need it)")


class ServerThread:
    """uvicorn serving create_app(model, config) on 127.0.0.1:<free port>, in a daemon thread."""

    def __init__(self, model, config):
        import uvicorn

        from engine.serve import create_app

        self.app = create_app(model, config)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="on",
                                                    log_config=None))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()

    def wait_ready(self, timeout: float = 120.0) -> None:
        import httpx
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"the server at {self.url} was not ready within {timeout} s")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{b64(data)}"


def png_bytes(image) -> bytes:
    import io
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def chat_body(prompt: str, image_url: str, **extra) -> dict:
    return {"model": "paligemma", "messages": [{"role": "user", "content": [
        {"type": "text", "text": prompt}, {"type": "image_url", "image_url": {"url": image_url}}]}], **extra}


def wait_until(predicate, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()
