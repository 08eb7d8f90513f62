"""python -m engine serve: an OpenAI-compatible HTTP server with PaliGemma task endpoints,
operations endpoints and a kiosk page, on the serving core (engine/serving), never on model
internals. Needs the `serve` extra (FastAPI + uvicorn + python-multipart).

    cli.py            the command line; binds, logs the address, runs uvicorn, SIGTERM -> exit 0
    app.py            create_app(model or loader, ServeConfig): state per app, errors, load + warm-up
    middleware.py     API key, body limit, metrics by endpoint/status, one JSON access-log line
    routes_openai.py  POST /v1/chat/completions (stream and not)
    routes_tasks.py   POST /v1/caption /answer /ocr /detect /segment (JSON or multipart)
    routes_ops.py     GET /health /metrics /v1/models, the kiosk page / and /static/*
    generation.py     requests -> model.submit -> text pieces / outcomes; stop strings; cancel
    schemas.py        request bodies (pydantic)
    images.py         data: / base64 / file:// (inside --media-dir) -> images; remote URLs refused
    metrics.py        Prometheus counters and histograms, per app
    sse.py            server-sent events that cancel the generation on disconnect
    static/           the kiosk page (index.html, kiosk.js, kiosk.css), no CDN
"""


def create_app(*args, **kwargs):
    """engine.serve.app.create_app (imported lazily: FastAPI is an optional dependency)."""
    from .app import create_app as _create_app
    return _create_app(*args, **kwargs)


__all__ = ["create_app"]
