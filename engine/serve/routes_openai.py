"""POST /v1/chat/completions, OpenAI's shape (checked against the `openai` client).

PaliGemma has no chat template: the prompt is the text of the LAST user message (its text parts
joined by spaces, e.g. "caption en" or "detect cat ; dog") and the images are those of that
message, in order. Earlier turns and system messages are ignored. temperature omitted or 0 is
greedy; n > 1 returns n choices (greedy: n equal ones; sampling: choice i uses seed + i) and is
refused with stream. Extensions (as llama.cpp): top_k, ignore_eos; `usage.timings` carries the
engine's timings (seconds).
"""
from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from .errors import ApiError
from .generation import Job
from .images import decode_source
from .schemas import ChatCompletionRequest, ImagePart, TextPart
from .sse import DONE, SSEResponse, event

router = APIRouter()
ENDPOINT = "/v1/chat/completions"


def prompt_and_images(body: ChatCompletionRequest, config) -> tuple[str, tuple]:
    last = body.messages[-1]
    if last.role != "user":
        raise ApiError(400, f"the last message must be the user's (it is {last.role!r}); PaliGemma answers the "
                            "last user message, e.g. 'caption en' with an image", param="messages")
    content = last.content
    parts = [TextPart(type="text", text=content)] if isinstance(content, str) else list(content or [])
    texts = [p.text.strip() for p in parts if isinstance(p, TextPart) and p.text.strip()]
    sources = [p.url for p in parts if isinstance(p, ImagePart)]
    if not sources:
        raise ApiError(400, "the last user message has no image; add an image_url part (data:image/...;base64, "
                            "raw base64, or file:// inside --media-dir): PaliGemma needs an image", param="messages")
    if not texts:
        raise ApiError(400, "the last user message has no text; give the task prompt, e.g. 'caption en', "
                            "'answer en what is this?' or 'detect cat ; dog'", param="messages")
    images = tuple(decode_source(s, config.media_dir, config.max_image_pixels, param=f"messages[-1].image[{i}]")
                   for i, s in enumerate(sources))
    return " ".join(texts), images


@router.post(ENDPOINT)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = request.app.state.server
    generations = state.require_ready()
    config = state.config
    for param, message in body.neutral_only_errors():
        raise ApiError(400, message, param=param, code="unsupported_parameter")
    if body.n > config.max_n:
        raise ApiError(400, f"n is {body.n}; this server returns at most {config.max_n} choices", param="n")
    if body.n > 1 and body.stream:
        raise ApiError(400, "n > 1 is not supported with stream=true; stream one choice, or drop stream",
                       param="n", code="unsupported_parameter")
    prompt, images = await state.call(prompt_and_images, body, config)     # decoding off the event loop
    task = prompt.split()[0].lower()
    n_prompt = generations.prompt_tokens(len(images), prompt)
    max_tokens = body.max_completion_tokens or body.max_tokens or generations.default_max_tokens(task, n_prompt)
    job = Job(images, prompt, max_tokens, temperature=body.temperature or 0.0, top_p=body.top_p or 1.0,
              top_k=body.top_k or 0, seed=body.seed or 0, stop=body.stops, ignore_eos=body.ignore_eos, n=body.n,
              endpoint=ENDPOINT)
    run = await state.call(generations.start, job)                        # preprocessing too
    log = request.scope.get("paligemma.log", {})
    cid, created, name = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), config.model_name
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return SSEResponse(_chunks(run, cid, created, name, include_usage, log), on_disconnect=run.cancel)
    outcome = await run.wait(request.is_disconnected)
    log.update(prompt_tokens=outcome.prompt_tokens, completion_tokens=outcome.completion_tokens)
    return {"id": cid, "object": "chat.completion", "created": created, "model": name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": reason}
                        for i, (text, reason) in enumerate(zip(outcome.texts, outcome.finish_reasons))],
            "usage": outcome.usage()}


async def _chunks(run, cid, created, name, include_usage, log):
    def chunk(delta, finish=None, **extra):
        return event({"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                      "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra})

    yield chunk({"role": "assistant", "content": ""})
    pieces = run.pieces()
    try:
        async for piece in pieces:
            yield chunk({"content": piece})
    except ApiError as e:
        yield event(e.body())
        yield DONE
        return
    finally:
        await pieces.aclose()
    outcome = run.outcome
    log.update(prompt_tokens=outcome.prompt_tokens, completion_tokens=outcome.completion_tokens)
    if include_usage:
        yield chunk({}, outcome.finish_reasons[0])
        yield event({"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                     "choices": [], "usage": outcome.usage()})
    else:
        yield chunk({}, outcome.finish_reasons[0], usage=outcome.usage())
    yield DONE
