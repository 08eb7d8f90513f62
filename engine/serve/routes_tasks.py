"""PaliGemma's tasks as JSON endpoints: POST /v1/caption, /v1/answer, /v1/ocr, /v1/detect, /v1/segment.

The body is JSON (schemas.TaskRequest, the image as base64 / data URL / file:// in --media-dir)
or multipart/form-data with the same fields and the image as a file part named `image`.

    {"task", "text", "finish_reason", "image": {"width", "height"}, "usage": {..., "timings"},
     "detections": [{"label", "box": [x0, y0, x1, y1]}],                       (detect)
     "segments": [{"label", "box", "mask": COCO RLE or null, "mask_area"}],    (segment)
     "colors": {label: [r, g, b]},         (detect / segment: engine.draw's colour of each label)
     "overlay_png": base64 PNG drawn by engine.draw}                            (overlay: true)

Boxes are in pixels of the original image (EXIF orientation applied); masks are uncompressed
COCO RLE (engine/rle.py). With "stream": true the answer is SSE: {"text": piece} events as the
text comes, then {"result": <the JSON above>}, then [DONE]. Prompts, parsing and default
max_tokens are engine.tasks', so each endpoint returns what model.caption / detect / ... return.

Several labels (detect / segment) follow engine.tasks' `multi_label`: "per_label" (the default)
sends one request per label, submitted together so the serving core batches them, and returns
their instances in label order ("text" joins the answers with " ; "); "joint" sends one prompt.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json

from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from .. import draw, tasks
from ..rle import encode as rle_encode
from .errors import ApiError
from .generation import Job
from .images import decode_bytes, decode_source
from .schemas import TaskRequest
from .sse import DONE, SSEResponse, event

router = APIRouter()
TASKS = ("caption", "answer", "ocr", "detect", "segment")
_BOOL = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


async def read_task_request(request: Request, config) -> tuple[TaskRequest, bytes | None]:
    """The fields and, for multipart, the uploaded image bytes."""
    ctype = request.headers.get("content-type", "").lower()
    if ctype.startswith("multipart/form-data"):
        try:
            form = await request.form(max_part_size=config.max_body_bytes, max_files=1)
        except HTTPException:                   # the body limit (413)
            raise
        except Exception as e:  # noqa: BLE001 - malformed multipart
            raise ApiError(400, f"cannot read the multipart form ({e}); send the image as a file part named "
                                "'image' and the other fields as text parts") from None
        fields, data = {}, None
        for key, value in form.multi_items():
            if hasattr(value, "read"):
                if key != "image":
                    raise ApiError(400, f"unexpected file part {key!r}; the image's part is named 'image'", param=key)
                data = await value.read()
            elif key == "labels" and value.strip().startswith("["):
                fields[key] = _json_field(key, value)
            elif key in ("overlay", "stream"):
                if value.lower() not in _BOOL:
                    raise ApiError(400, f"{key} must be true or false, got {value!r}", param=key)
                fields[key] = _BOOL[value.lower()]
            else:
                fields[key] = value
        body = _validate(fields)
        if data is None and body.image is None:
            raise ApiError(400, "no image: add a file part named 'image' (or an 'image' field with base64)",
                           param="image")
        return body, data
    try:
        raw = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the body is not valid JSON; send a JSON object (Content-Type: application/json) or a "
                            "multipart/form-data upload") from None
    if not isinstance(raw, dict):
        raise ApiError(400, "the body must be a JSON object, e.g. {\"image\": \"<base64>\", \"labels\": [\"cat\"]}")
    body = _validate(raw)
    if body.image is None:
        raise ApiError(400, "no image: add an 'image' field (data:image/...;base64 URL, raw base64, or file:// "
                            "inside --media-dir)", param="image")
    return body, None


def _json_field(key, value):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise ApiError(400, f"{key} is not valid JSON: {value!r}", param=key) from None


def _validate(fields: dict) -> TaskRequest:
    from .app import validation_error
    try:
        return TaskRequest.model_validate(fields)
    except ValidationError as e:
        raise validation_error(e.errors()) from None


def task_prompts(task: str, body: TaskRequest) -> list[str]:
    """engine.tasks' prompts of the task (one, or one per label); its ValueErrors become 400s."""
    try:
        if task == "caption":
            return [tasks.caption_prompt(body.lang)]
        if task == "answer":
            if body.question is None:
                raise ApiError(400, "answer needs a 'question'", param="question")
            return [tasks.answer_prompt(body.question, body.lang)]
        if task == "ocr":
            return [tasks.ocr_prompt()]
        if body.labels is None:
            raise ApiError(400, f"{task} needs 'labels', e.g. [\"cat\", \"dog\"] or \"cat ; dog\"", param="labels")
        return tasks.label_prompts(task, body.labels, body.multi_label)
    except ValueError as e:
        raise ApiError(400, str(e), code="invalid_value") from None


def combined_usage(outcomes) -> dict:
    """Tokens summed over the task's requests; the timings of the one that ended last."""
    last = max(outcomes, key=lambda o: o.timings.get("total", 0.0))
    usage = {"prompt_tokens": sum(o.prompt_tokens for o in outcomes),
             "completion_tokens": sum(o.completion_tokens for o in outcomes), "timings": last.timings}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return usage


def task_result(task: str, model, image, prompts: list[str], outcomes: list, overlay: bool) -> dict:
    """The task's JSON, from the model's raw texts (parsed like engine.tasks does)."""
    width, height = image.size
    raws = [o.raw_texts[0] for o in outcomes]
    reasons = [o.finish_reasons[0] for o in outcomes]
    out = {"task": task, "text": " ; ".join(r.strip() for r in raws),
           "finish_reason": next((r for r in reasons if r != "stop"), "stop"),
           "image": {"width": width, "height": height}, "usage": combined_usage(outcomes)}
    if len(prompts) > 1:
        out["requests"] = [{"prompt": p, "text": r.strip(), "finish_reason": f}
                           for p, r, f in zip(prompts, raws, reasons)]
    items = []
    if task == "detect":
        items = [d for raw in raws for d in tasks.parse_detections(raw, width, height)]
        out["detections"] = [{"label": d.label, "box": [float(v) for v in d.box]} for d in items]
    elif task == "segment":
        decoder = model.seg_decoder
        items = [sg for raw in raws for sg in tasks.parse_segments(raw, width, height, decoder)]
        out["segments"] = [{"label": s.label, "box": [float(v) for v in s.box],
                            "mask": None if s.mask is None else rle_encode(s.mask),
                            "mask_area": None if s.mask is None else int(s.mask.sum())} for s in items]
        if decoder is None:
            out["warning"] = "this model has no mask decoder, so segments carry boxes only (mask null)"
    if task in ("detect", "segment"):
        out["colors"] = {label: list(c) for label, c in draw.label_colors(items).items()}   # engine.draw's
    if overlay:
        drawn = draw.draw_detections(image, items) if task == "detect" else draw.draw_segments(image, items)
        buf = io.BytesIO()
        drawn.save(buf, format="PNG")
        out["overlay_png"] = base64.b64encode(buf.getvalue()).decode()
    return out


def start_runs(generations, task: str, image, prompts: list[str], body: TaskRequest, endpoint: str) -> list:
    """Submit the task's prompts together (all or none: a refused one cancels those already in)."""
    runs = []
    try:
        for prompt in prompts:
            n_prompt = generations.prompt_tokens(1, prompt)
            max_tokens = body.max_tokens or generations.default_max_tokens(task, n_prompt)
            runs.append(generations.start(Job((image,), prompt, max_tokens, temperature=body.temperature,
                                              top_p=body.top_p, seed=body.seed, endpoint=endpoint)))
    except BaseException:
        for run in runs:
            run.cancel()
        raise
    return runs


def _make_route(task: str):
    endpoint = f"/v1/{task}"

    async def route(request: Request):
        state = request.app.state.server
        generations = state.require_ready()
        config = state.config
        body, data = await read_task_request(request, config)
        if body.overlay and task not in ("detect", "segment"):
            raise ApiError(400, "overlay is drawn for detect and segment only; drop it for text tasks",
                           param="overlay")
        if body.labels is not None and task not in ("detect", "segment"):
            raise ApiError(400, f"{task} takes no labels (they are for detect and segment)", param="labels")
        if body.question is not None and task != "answer":
            raise ApiError(400, f"{task} takes no question (it is for answer)", param="question")
        if body.multi_label is not None and task not in ("detect", "segment"):
            raise ApiError(400, f"{task} takes no multi_label (it is for detect and segment)", param="multi_label")
        prompts = task_prompts(task, body)
        if data is not None:
            image = await state.call(decode_bytes, data, config.max_image_pixels, "image")
        else:
            image = await state.call(decode_source, body.image, config.media_dir, config.max_image_pixels, "image")
        runs = await state.call(start_runs, generations, task, image, prompts, body, endpoint)
        log = request.scope.get("paligemma.log", {})

        async def finish(outcomes) -> dict:
            log.update(prompt_tokens=sum(o.prompt_tokens for o in outcomes),
                       completion_tokens=sum(o.completion_tokens for o in outcomes))
            return await state.call(task_result, task, generations.model, image, prompts, outcomes, body.overlay)

        def cancel_all():
            for run in runs:
                run.cancel()

        if not body.stream:
            try:
                outcomes = await asyncio.gather(*(run.wait(request.is_disconnected) for run in runs))
            finally:
                for run in runs:                 # one failed (or the client left): stop the others
                    if run.outcome is None:
                        run.cancel()
            return await finish(list(outcomes))

        async def events():
            try:
                for i, run in enumerate(runs):       # they decode together; their text goes out in order
                    if i:
                        yield event({"text": " ; "})
                    pieces = run.pieces()
                    try:
                        async for piece in pieces:
                            yield event({"text": piece})
                    finally:
                        await pieces.aclose()
                yield event({"result": await finish([run.outcome for run in runs])})
            except ApiError as e:
                yield event(e.body())
            finally:
                cancel_all()
            yield DONE

        return SSEResponse(events(), on_disconnect=cancel_all)

    route.__name__ = f"task_{task}"
    router.add_api_route(endpoint, route, methods=["POST"], summary=f"PaliGemma {task}")


for _task in TASKS:
    _make_route(_task)
