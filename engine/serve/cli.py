"""`python -m engine serve`: load a model and serve it over HTTP (uvicorn).

    python -m engine serve [--model DIR] [--backend openvino|onnxruntime] [--weights int8] [--threads N]
                           [--host 127.0.0.1] [--port 8000] [--max-queue N] [--max-batch N]
                           [--max-body-mb N] [--api-key KEY] [--media-dir DIR] [--grace-seconds S]

The socket is bound first and its address logged at once; the model loads and warms in the
background (GET /health turns 200 when it is ready). SIGTERM or Ctrl-C: stop accepting, finish
the requests in flight within --grace-seconds (then cancel what is left), exit 0.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from ..runtime import BACKENDS, DEFAULT_BACKEND

API_KEY_ENV = "PALIGEMMA_API_KEY"


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def _positive_float(s: str) -> float:
    v = float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s}")
    return v


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m engine serve",
                description="OpenAI-compatible HTTP server with PaliGemma task endpoints and a kiosk page at /")
    p.add_argument("--model", help="exported artifact dir, or HF checkpoint dir (exported once into the cache); "
                                   "default: the bundled default model")
    p.add_argument("--backend", default=DEFAULT_BACKEND, choices=BACKENDS)
    p.add_argument("--weights", default="int8", help="weight format when --model is an HF checkpoint (default int8)")
    p.add_argument("--threads", type=_positive_int, default=None, help="model threads (default: one per core)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--max-queue", type=_positive_int, default=64,
                   help="requests waiting for a place in the batch; beyond it 429 (default 64)")
    p.add_argument("--max-batch", type=_positive_int, default=16,
                   help="requests decoded together at most (default 16)")
    p.add_argument("--max-body-mb", type=_positive_float, default=20.0, help="request body limit, MiB (default 20)")
    p.add_argument("--max-image-pixels", type=_positive_int, default=40_000_000,
                   help="largest image accepted, width x height (default 40,000,000; guards against bombs)")
    p.add_argument("--api-key", default=None,
                   help=f"require this key (Authorization: Bearer KEY) on /v1/* and /metrics; default: "
                        f"${API_KEY_ENV} if set, else no key")
    p.add_argument("--media-dir", type=Path, default=None,
                   help="directory whose files may be sent as file:// image URLs (default: none)")
    p.add_argument("--model-name", default=None, help="model id in /v1/models (default: from --model)")
    p.add_argument("--grace-seconds", type=_positive_float, default=30.0,
                   help="on SIGTERM, time left to the requests in flight (default 30)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--no-access-log", action="store_true", help="no JSON line per request")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import uvicorn  # noqa: F401
        import fastapi  # noqa: F401
    except ImportError as e:
        print(f"error: the server needs the 'serve' extra ({e.name} is missing): pip install 'paligemma-edge[serve]'",
              file=sys.stderr)
        return 2
    if args.media_dir is not None and not args.media_dir.is_dir():
        print(f"error: --media-dir {args.media_dir} is not a directory", file=sys.stderr)
        return 2
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    access = logging.getLogger("engine.serve.access")     # one bare JSON object per line
    access.setLevel(logging.WARNING if args.no_access_log else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.propagate = False
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e}; pick another --port", file=sys.stderr)
        return 2
    return serve(args, sock)


def serve(args, sock: socket.socket) -> int:
    import uvicorn

    from .app import ServeConfig, create_app

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    name = args.model_name or (Path(args.model).name if args.model else "paligemma-default")
    config = ServeConfig(model_name=name, api_key=api_key, max_body_bytes=int(args.max_body_mb * 2 ** 20),
                         max_image_pixels=args.max_image_pixels, media_dir=args.media_dir,
                         workers=args.max_queue + args.max_batch + 16)

    def load_model():
        import engine
        from engine.serving import SchedulerConfig
        return engine.load(args.model, backend=args.backend, threads=args.threads, weights=args.weights,
                           serving=SchedulerConfig(max_queue=args.max_queue, max_active=args.max_batch),
                           progress=False)

    app = create_app(load_model, config)
    uv_config = uvicorn.Config(app, log_level=args.log_level, access_log=False, lifespan="on",
                               timeout_graceful_shutdown=int(max(1, round(args.grace_seconds))),
                               log_config=None)
    server = uvicorn.Server(uv_config)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    logging.getLogger("engine.serve").info(
        "listening on http://%s:%d (kiosk page at /, OpenAI API at /v1, health at /health)%s; loading the model",
        shown, port, ", API key required" if api_key else "")
    # uvicorn re-raises the signal it caught once it has shut down; with this handler in place the
    # re-raised SIGTERM is a no-op and the process exits 0 after the graceful shutdown.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run(sockets=[sock])
    logging.getLogger("engine.serve").info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
