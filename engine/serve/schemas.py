"""Request bodies, checked by pydantic: a wrong type, a value out of range or an unknown
parameter is refused with 400 naming the parameter (app.py turns validation errors into ApiError).

Chat completions follow OpenAI's shape. Parameters OpenAI defines that this server cannot honour
are accepted only at their neutral value (frequency_penalty 0, logprobs false, ...), so a client
that relies on them hears about it instead of getting silently different output.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Strict):
    url: str
    detail: Optional[Literal["auto", "low", "high"]] = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: Union[ImageURL, str]

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[Union[TextPart, ImagePart]], None] = None
    name: Optional[str] = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatCompletionRequest(_Strict):
    """POST /v1/chat/completions. temperature omitted or 0: greedy (PaliGemma's usual decoding)."""
    model: Optional[str] = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    top_k: Optional[int] = Field(default=None, ge=0)                 # llama.cpp's extension
    seed: Optional[int] = Field(default=None, ge=0, lt=2 ** 63)
    stop: Union[str, list[str], None] = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    ignore_eos: bool = False                                          # llama.cpp's extension
    # OpenAI parameters accepted only at their neutral value
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    response_format: Optional[ResponseFormat] = None
    logit_bias: Optional[dict] = None
    tools: Optional[list] = None
    tool_choice: Optional[Literal["none", "auto"]] = None
    parallel_tool_calls: Optional[bool] = None
    user: Optional[str] = None
    metadata: Optional[dict] = None
    store: Optional[bool] = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return v

    def neutral_only_errors(self) -> list[tuple[str, str]]:
        """(param, message) for OpenAI parameters set to a value this server does not support."""
        out = []
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            if v not in (None, 0, 0.0):
                out.append((name, f"{name} is not supported (only 0); use top_p / temperature instead"))
        if self.logprobs or self.top_logprobs:
            out.append(("logprobs", "logprobs are not supported; leave logprobs unset or false"))
        if self.logit_bias:
            out.append(("logit_bias", "logit_bias is not supported; leave it unset"))
        if self.tools:
            out.append(("tools", "tools are not supported: PaliGemma has no tool calling"))
        return out

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class TaskRequest(_Strict):
    """POST /v1/{caption,answer,ocr,detect,segment} (JSON, or the same fields as multipart form
    fields with the image as a file part named `image`)."""
    image: Optional[str] = None            # data URL, raw base64, or file:// inside --media-dir
    labels: Union[str, list[str], None] = None       # detect / segment: ["cat", "dog"] or "cat ; dog"
    multi_label: Optional[Literal["per_label", "joint"]] = None   # engine.tasks' (None: per_label)
    question: Optional[str] = None                   # answer
    lang: str = "en"                                 # caption / answer
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int = Field(default=0, ge=0, lt=2 ** 63)
    overlay: bool = False                            # detect / segment: add overlay_png (base64)
    stream: bool = False                             # SSE: text pieces, then the result
