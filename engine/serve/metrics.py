"""Prometheus metrics of one app instance (text exposition format 0.0.4).

Counters and histograms live in a `Metrics` object owned by the app (no process-global
registry), so two apps in one process count separately. Gauges that describe the model
(queue depth, live batch) are read from the serving core at scrape time.

    paligemma_requests_total{endpoint, status}            counter
    paligemma_generated_tokens_total{endpoint}            counter
    paligemma_prompt_tokens_total{endpoint}               counter
    paligemma_request_duration_seconds{endpoint}          histogram (server wall time)
    paligemma_time_to_first_token_seconds{endpoint}       histogram (engine: image in -> first token)
    paligemma_queue_depth, paligemma_live_requests, paligemma_prefilling_requests,
    paligemma_kv_cache_bytes, paligemma_ready, paligemma_in_flight_http_requests   gauges
"""
from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)      # per bucket, not cumulative; last = +Inf
    total: float = 0.0
    n: int = 0

    def __post_init__(self):
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, cum = [], 0
        sep = "," if labels else ""
        for le, c in zip([*map(_num, self.buckets), "+Inf"], self.counts):
            cum += c
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {cum}')
        lab = f"{{{labels}}}" if labels else ""
        out.append(f"{name}_sum{lab} {_num(self.total)}")
        out.append(f"{name}_count{lab} {self.n}")
        return out


class Metrics:
    """Thread-safe counters and histograms of one server."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.generated_tokens: dict[str, int] = {}
        self.prompt_tokens: dict[str, int] = {}
        self.latency: dict[str, Histogram] = {}
        self.ttft: dict[str, Histogram] = {}
        self.in_flight = 0
        self.recent_latency_s = 1.0              # moving average, for Retry-After

    def request_started(self) -> None:
        with self._lock:
            self.in_flight += 1

    def request_finished(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.in_flight -= 1
            key = (endpoint, int(status))
            self.requests[key] = self.requests.get(key, 0) + 1
            self.latency.setdefault(endpoint, Histogram()).observe(seconds)
            if status < 400:
                self.recent_latency_s = 0.9 * self.recent_latency_s + 0.1 * seconds

    def generation(self, endpoint: str, prompt_tokens: int, new_tokens: int, first_token_s: float | None) -> None:
        with self._lock:
            self.generated_tokens[endpoint] = self.generated_tokens.get(endpoint, 0) + new_tokens
            self.prompt_tokens[endpoint] = self.prompt_tokens.get(endpoint, 0) + prompt_tokens
            if first_token_s is not None:
                self.ttft.setdefault(endpoint, Histogram()).observe(first_token_s)

    def requests_total(self, endpoint: str, status: int) -> int:
        with self._lock:
            return self.requests.get((endpoint, status), 0)

    def render(self, state, ready: bool) -> str:
        """The exposition text; `state` is the model's SchedulerState (None while loading)."""
        with self._lock:
            lines = ["# HELP paligemma_requests_total HTTP requests by endpoint and status.",
                     "# TYPE paligemma_requests_total counter"]
            for (ep, status), n in sorted(self.requests.items()):
                lines.append(f'paligemma_requests_total{{endpoint="{ep}",status="{status}"}} {n}')
            for name, table, help_ in (
                    ("paligemma_generated_tokens_total", self.generated_tokens, "Tokens generated."),
                    ("paligemma_prompt_tokens_total", self.prompt_tokens, "Prompt tokens (image tokens included).")):
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} counter"]
                lines += [f'{name}{{endpoint="{ep}"}} {n}' for ep, n in sorted(table.items())]
            for name, table, help_ in (
                    ("paligemma_request_duration_seconds", self.latency, "Server time per request."),
                    ("paligemma_time_to_first_token_seconds", self.ttft,
                     "Engine time from the image in to the first token out.")):
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
                for ep, h in sorted(table.items()):
                    lines += h.lines(name, f'endpoint="{ep}"')
            gauges = [("paligemma_ready", "1 once the model is loaded and warm.", int(ready)),
                      ("paligemma_in_flight_http_requests", "HTTP requests being served.", self.in_flight)]
        if state is not None:
            gauges += [("paligemma_queue_depth", "Requests waiting for a place in the batch.", state.queued),
                       ("paligemma_live_requests", "Requests in prefill or decode (the live batch).",
                        state.prefilling + state.decoding),
                       ("paligemma_prefilling_requests", "Requests in prefill.", state.prefilling),
                       ("paligemma_kv_cache_bytes", "KV cache bytes of the live requests.", state.kv_cache_bytes),
                       ("paligemma_image_cache_entries", "Images in the feature cache.", state.image_cache_entries)]
        for name, help_, value in gauges:
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name} {value}"]
        return "\n".join(lines) + "\n"


def _num(v: float) -> str:
    return repr(float(v)) if not float(v).is_integer() else f"{float(v):.1f}"
