"""What /metrics and /health report: request counts and latencies, tokens, tokens per second,
queue depth and batch sizes, kept by `Metrics` and written in Prometheus' text format.

    metrics = Metrics()
    app.add_middleware(ObserveRequests, metrics=metrics)   # counts and times every request
    Scheduler(engine, metrics=metrics)                     # counts tokens and batches
    metrics.prometheus(queue_depth=0, model="my-model")    # the /metrics body

The worker thread and the event loop both update it, so every change holds `metrics.lock`.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import threading
import time


class Metrics:
    """Counters behind /metrics; updated from the worker thread and the event loop."""

    LATENCY_WINDOW = 1000  # latest requests kept for the latency quantiles
    RATE_WINDOW_S = 60.0
    BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()  # (endpoint, status) -> n
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.batches = 0
        self.batch_rows_sum = 0
        self.batch_rows_max = 0
        self.batch_hist = [0] * len(self.BATCH_BUCKETS)
        self.active_rows = 0
        self.latencies: collections.deque = collections.deque(maxlen=self.LATENCY_WINDOW)
        self.latency_sum = 0.0
        self.latency_count = 0
        self._recent: collections.deque = collections.deque()  # (monotonic second, tokens)

    def request_done(self, endpoint: str, status: int | str, seconds: float) -> None:
        with self.lock:
            self.requests[(endpoint, str(status))] += 1
            self.latencies.append(seconds)
            self.latency_sum += seconds
            self.latency_count += 1

    def tokens(self, n: int = 1) -> None:
        now = int(time.monotonic())
        with self.lock:
            self.generated_tokens += n
            if self._recent and self._recent[-1][0] == now:
                self._recent[-1][1] += n
            else:
                self._recent.append([now, n])
            self._trim(now)

    def batch(self, rows: int, prompt_tokens: int) -> None:
        with self.lock:
            self.batches += 1
            self.batch_rows_sum += rows
            self.batch_rows_max = max(self.batch_rows_max, rows)
            i = bisect.bisect_left(self.BATCH_BUCKETS, rows)
            if i < len(self.batch_hist):
                self.batch_hist[i] += 1
            self.prompt_tokens += prompt_tokens

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] <= now - self.RATE_WINDOW_S:
            self._recent.popleft()

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last minute (or since the first token)."""
        now = time.monotonic()
        with self.lock:
            self._trim(int(now))
            if not self._recent:
                return 0.0
            span = min(self.RATE_WINDOW_S, max(now - self._recent[0][0], 1.0))
            return sum(n for _, n in self._recent) / span

    def prometheus(self, *, queue_depth: int, model: str) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        rate = self.tokens_per_second()
        with self.lock:
            lat = sorted(self.latencies)
            out = [
                "# HELP plinth_requests_total HTTP requests answered, by endpoint and status.",
                "# TYPE plinth_requests_total counter",
            ]
            for (endpoint, status), n in sorted(self.requests.items()):
                out.append(f'plinth_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
            out += [
                "# HELP plinth_prompt_tokens_total Prompt tokens of the rows that ran.",
                "# TYPE plinth_prompt_tokens_total counter",
                f"plinth_prompt_tokens_total {self.prompt_tokens}",
                "# HELP plinth_generated_tokens_total Tokens generated.",
                "# TYPE plinth_generated_tokens_total counter",
                f"plinth_generated_tokens_total {self.generated_tokens}",
                "# HELP plinth_tokens_per_second Generated tokens per second, last minute.",
                "# TYPE plinth_tokens_per_second gauge",
                f"plinth_tokens_per_second {rate:.3f}",
                "# HELP plinth_queue_depth Requests waiting to join the decode loop.",
                "# TYPE plinth_queue_depth gauge",
                f"plinth_queue_depth {queue_depth}",
                "# HELP plinth_active_batch_size Rows in the batch decoding now.",
                "# TYPE plinth_active_batch_size gauge",
                f"plinth_active_batch_size {self.active_rows}",
                "# HELP plinth_batch_size_max Most rows decoded together so far.",
                "# TYPE plinth_batch_size_max gauge",
                f"plinth_batch_size_max {self.batch_rows_max}",
                "# HELP plinth_batch_size Rows per decode step (live rows of the running batch).",
                "# TYPE plinth_batch_size histogram",
            ]
            for le, n in zip(self.BATCH_BUCKETS, itertools.accumulate(self.batch_hist),
                             strict=True):
                out.append(f'plinth_batch_size_bucket{{le="{le}"}} {n}')
            out += [
                f'plinth_batch_size_bucket{{le="+Inf"}} {self.batches}',
                f"plinth_batch_size_sum {self.batch_rows_sum}",
                f"plinth_batch_size_count {self.batches}",
                "# HELP plinth_request_latency_seconds Request latency, arrival to last byte "
                f"(quantiles over the latest {self.LATENCY_WINDOW}).",
                "# TYPE plinth_request_latency_seconds summary",
            ]
            for q in (0.5, 0.9, 0.99):
                v = lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")
                out.append(f'plinth_request_latency_seconds{{quantile="{q}"}} {v:.6f}')
            out += [
                f"plinth_request_latency_seconds_sum {self.latency_sum:.6f}",
                f"plinth_request_latency_seconds_count {self.latency_count}",
                "# HELP plinth_model_info The model being served.",
                "# TYPE plinth_model_info gauge",
                f'plinth_model_info{{model="{_label(model)}"}} 1',
            ]
        return "\n".join(out) + "\n"


def _label(value: str) -> str:
    """A Prometheus label value: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class ObserveRequests:
    """Pure ASGI middleware: counts every answered request by endpoint and status and times it
    to its last byte (streams included); a handler may override the status it recorded (499:
    the client went away)."""

    ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status, recorded, started = [500], [False], [False]
        path = scope.get("path", "")
        endpoint = next((e for e in self.ENDPOINTS if path.startswith(e)), "other")

        def record():
            if not recorded[0]:
                recorded[0] = True
                code = scope.get("plinth.status", status[0])
                self.metrics.request_done(endpoint, code, time.perf_counter() - start)

        async def observed_send(message):
            if message["type"] == "http.response.start":
                status[0], started[0] = message["status"], True
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                record()  # before the last byte leaves: a client that got it sees it counted
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            if started[0] and not recorded[0]:  # a response cut off: the client went away
                scope.setdefault("plinth.status", 499)
            record()
