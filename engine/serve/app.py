"""The FastAPI app: create_app(model or loader, ServeConfig) -> app.

Everything the server keeps lives on the app instance (app.state.server, a ServerState): the
config, its metrics, its worker threads and the model. The model is loaded (when a loader is
given) and warmed on a background thread at startup, so the server listens at once; /health says
503 "loading" until the model is loaded and warm, and /v1/* answers 503 with Retry-After meanwhile.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import ApiError, error_body
from .generation import Generations
from .metrics import Metrics
from .middleware import HttpGuard

LOG = logging.getLogger("engine.serve")


@dataclass(frozen=True)
class ServeConfig:
    """model_name: the id in /v1/models and in responses. api_key: None = open. max_body_bytes:
    413 beyond. max_image_pixels: 400 beyond (decompression bombs). media_dir: where file:// URLs
    may point (None: file:// refused). max_n: the largest `n` of a chat completion.
    workers: threads that follow requests (each in-flight request holds one while it waits)."""
    model_name: str = "paligemma"
    api_key: str | None = None
    max_body_bytes: int = 20 << 20
    max_image_pixels: int = 40_000_000
    media_dir: Path | None = None
    max_n: int = 8
    workers: int = 96
    warmup: bool = True


class ServerState:
    """What one app holds. `model` is None until loaded; `ready` is set once it is warm."""

    def __init__(self, config: ServeConfig, metrics: Metrics):
        self.config = config
        self.metrics = metrics
        self.model = None
        self.generations: Generations | None = None
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self.executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="serve-request")
        self.owns_model = False
        self.started = time.time()

    async def call(self, fn, *args):
        """fn(*args) on the app's worker threads (image decoding, preprocessing: not on the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def require_ready(self) -> Generations:
        if self.load_error is not None:
            raise ApiError(503, f"the model failed to load: {self.load_error}; fix it and restart the server",
                           code="model_load_failed")
        if not self.ready.is_set():
            raise ApiError(503, "the model is still loading; retry shortly (GET /health says when it is ready)",
                           code="loading", headers={"Retry-After": "2"})
        return self.generations


def warm_up(model) -> None:
    """One short generation through every graph, so the first request does not pay for it."""
    from PIL import Image
    model.generate(Image.new("RGB", (32, 32), (128, 128, 128)), "caption en", max_new_tokens=2)


def _load(state: ServerState, model_or_loader) -> None:
    try:
        t0 = time.perf_counter()
        if callable(model_or_loader) and not hasattr(model_or_loader, "submit"):
            model = model_or_loader()
            state.owns_model = True
        else:
            model = model_or_loader
        state.model = model
        state.generations = Generations(model, state.executor, state.metrics)
        t1 = time.perf_counter()
        if state.config.warmup:
            warm_up(model)
        state.ready.set()
        LOG.info("model ready: loaded in %.1f s, warmed in %.1f s", t1 - t0, time.perf_counter() - t1)
    except BaseException as e:  # noqa: BLE001 - reported by /health and every request
        state.load_error = e
        LOG.error("the model failed to load: %s", e)


def create_app(model_or_loader: Union[object, Callable[[], object]], config: ServeConfig | None = None) -> FastAPI:
    """The app for a loaded model (PaliGemma) or a loader (a callable returning one, then owned
    and closed by the app)."""
    from . import routes_openai, routes_ops, routes_tasks

    config = config or ServeConfig()
    state = ServerState(config, Metrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        thread = threading.Thread(target=_load, args=(state, model_or_loader), name="serve-load", daemon=True)
        thread.start()
        yield
        state.ready.clear()
        state.executor.shutdown(wait=False, cancel_futures=True)
        if state.owns_model and state.model is not None:
            state.model.close()

    app = FastAPI(title="paligemma-edge", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = state

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        return JSONResponse(validation_error(e.errors()).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        message = {404: f"no such endpoint: {request.method} {request.url.path}; see GET /v1/models and the "
                        "README's Server section", 405: f"{request.method} is not allowed on {request.url.path}"}
        code = "body_too_large" if e.status_code == 413 else None
        return JSONResponse(error_body(e.status_code, message.get(e.status_code, str(e.detail)), code),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):
        LOG.exception("internal error on %s", request.url.path)
        return JSONResponse(error_body(500, f"internal error: {type(e).__name__}: {e}"), status_code=500)

    app.include_router(routes_openai.router)
    app.include_router(routes_tasks.router)
    app.include_router(routes_ops.router)
    app.add_middleware(HttpGuard, state=state)
    return app


def validation_error(errors) -> ApiError:
    """pydantic errors -> one 400 naming the first offending parameter."""
    parts, first = [], None
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query")]
        param = ".".join(loc) or "body"
        first = first or param
        if err.get("type") == "extra_forbidden":
            parts.append(f"unknown parameter {param!r}")
        elif err.get("type") == "json_invalid":
            parts.append("the body is not valid JSON")
        else:
            parts.append(f"{param}: {err.get('msg')}" + (f" (got {err['input']!r})" if "input" in err
                                                          and not isinstance(err["input"], (dict, list)) else ""))
    return ApiError(400, "; ".join(parts[:5]) or "invalid request", param=first, code="invalid_value")
