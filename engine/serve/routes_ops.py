"""Operations and the kiosk page: GET /health, /metrics, /v1/models, / and /static/*."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse

from .errors import ApiError

router = APIRouter()
STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}


def _state(request: Request):
    return request.app.state.server


@router.get("/health")
async def health(request: Request):
    """200 {"status": "ok"} once the model is loaded and warm; 503 "loading" or "error" before."""
    s = _state(request)
    if s.load_error is not None:
        return JSONResponse({"status": "error", "ready": False, "error": str(s.load_error)}, status_code=503)
    if not s.ready.is_set():
        return JSONResponse({"status": "loading", "ready": False}, status_code=503, headers={"Retry-After": "2"})
    st = s.model.serving_state()
    return {"status": "ok", "ready": True, "model": s.config.model_name,
            "queued": st.queued, "live": st.prefilling + st.decoding}


@router.get("/metrics")
async def metrics(request: Request):
    s = _state(request)
    state = s.model.serving_state() if s.model is not None else None
    return PlainTextResponse(s.metrics.render(state, s.ready.is_set()),
                             media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/models")
async def models(request: Request):
    s = _state(request)
    model = s.model
    info = {"id": s.config.model_name, "object": "model", "created": int(s.started), "owned_by": "paligemma-edge"}
    if model is not None:
        info.update({"backend": model.backend, "context_length": model.max_context,
                     "image_size": model.config.vision.image_size, "segment_masks": model.seg_decoder is not None})
    return {"object": "list", "data": [info]}


@router.get("/")
async def index():
    return FileResponse(STATIC_DIR / "index.html", media_type=STATIC_TYPES[".html"])


@router.get("/static/{name}")
async def static(name: str):
    path = (STATIC_DIR / name).resolve()
    if path.parent != STATIC_DIR or not path.is_file() or path.suffix not in STATIC_TYPES:
        raise ApiError(404, f"no static file {name!r}")
    return FileResponse(path, media_type=STATIC_TYPES[path.suffix])
