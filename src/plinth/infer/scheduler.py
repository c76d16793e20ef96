"""Continuous batching for the server: one worker thread owns the model and one running
`Engine.session` decode loop, which requests join and leave between decode steps.

    sched = Scheduler(engine, max_batch=8, max_queue=64); sched.start()
    job = Job(prompts=[ids], params=[SamplingParams(max_new_tokens=16)], loop=loop)
    sched.submit(job)            # QueueFull when max_queue jobs already wait
    kind, *data = await job.events.get()   # ("token", choice, id, text) ... ("done", [Completion])

Policy (iteration-level batching, as vLLM and TGI): before every decode step the worker moves
waiting jobs, in arrival order, into the session while their rows fit in the `max_batch` rows
(sequences) it decodes together; a job that does not fit waits (and holds the ones behind it)
until rows finish. A new row is prefilled on its own and joins at the next step, so a request
that arrives while others decode starts within one step instead of waiting for the batch to
end, and a row leaves the batch the step it finishes, freeing its place. A job with more rows
than max_batch runs alone. When the worker is idle and wakes to a short queue it waits
`batch_wait_s` (a few milliseconds) for more jobs, so a burst of requests that arrive together
is prefilled together. (An encoder-decoder session takes new rows only when it is empty.)

Tokens travel from the worker thread to each job's asyncio queue with
`loop.call_soon_threadsafe`. A job marked `cancelled` (client gone, timeout) stops its rows at
their next token (`on_token` returns False) while the other rows go on; a cancelled job that is
still waiting never runs. A job the engine refuses as it joins (UsageError) fails alone; a
decode step that raises fails the jobs running in it, and the worker goes on with a new
session.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from plinth.infer.metrics import Metrics

log = logging.getLogger("plinth.serve")


class QueueFull(Exception):
    """max_queue jobs are already waiting."""


class SchedulerStopped(Exception):
    """The worker is not running (server shutting down, or it failed)."""


@dataclass(eq=False)
class Job:
    """One HTTP request: one or more rows (prompts x n), answered through `events`.

    Events, in order: ("token", choice_index, token_id, text_delta) per produced token, then
    ("done", [Completion per row]) or ("error", exception)."""

    prompts: list[list[int]]
    params: list[Any]  # SamplingParams per row
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    started: bool = False  # a batch picked it up
    emitted: bool = False  # at least one token event was sent
    enqueued_at: float = field(default_factory=time.monotonic)

    @property
    def rows(self) -> int:
        return len(self.prompts)

    def push(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop closed (server stopped): nobody is listening
            self.cancelled = True


class Scheduler:
    """A bounded FIFO of jobs and the one worker thread that batches them into the engine."""

    def __init__(self, engine, *, max_batch: int = 8, max_queue: int = 64,
                 batch_wait_s: float = 0.005, metrics: Metrics | None = None):
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self.batch_wait_s = batch_wait_s
        self.metrics = metrics or Metrics()
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.error: BaseException | None = None  # what killed the worker, if anything

    # -- the event-loop side ---------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop

    def start(self) -> None:
        self._stop = False
        self._thread = threading.Thread(target=self._worker, name="plinth-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking batches; waiting jobs get SchedulerStopped, the running batch ends."""
        with self._cond:
            self._stop = True
            waiting = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in waiting:
            job.push("error", SchedulerStopped("the server is shutting down"))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self._cond:
            if not self.alive:
                raise SchedulerStopped(
                    "the batching worker is not running"
                    + (f" (it failed: {self.error!r})" if self.error else "")
                )
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are already waiting")
            self._queue.append(job)
            self._cond.notify()

    # -- the worker thread -----------------------------------------------------------------
    def _take(self, free: int, running: bool) -> list[Job]:
        """Waiting jobs in order while their rows fit in `free` rows (a job with more rows than
        max_batch runs alone); cancelled jobs are dropped unrun. With nothing `running` it
        waits for a job, then `batch_wait_s` for more; while rows decode it does not wait."""
        with self._cond:
            if not running:
                while not self._queue and not self._stop:
                    self._cond.wait()
                deadline = time.monotonic() + self.batch_wait_s
                while sum(j.rows for j in self._queue) < free and not self._stop:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            if self._stop:
                return []
            batch: list[Job] = []
            rows = 0
            while self._queue:
                job = self._queue[0]
                if job.cancelled:
                    self._queue.popleft()
                    continue
                if rows + job.rows > free and (batch or running):
                    break
                batch.append(self._queue.popleft())
                rows += job.rows
            for job in batch:
                job.started = True
            return batch

    def _worker(self) -> None:
        try:
            session = self.engine.session()
            owners: dict[int, tuple[Job, int]] = {}  # session row -> (job, choice index)
            results: dict[Job, list] = {}  # running job -> its completions so far
            while not self._stop or session.live:
                if not self._stop and session.joinable:
                    free = self.max_batch - session.live
                    if free > 0:
                        for job in self._take(free, running=session.live > 0):
                            self._admit(session, job, owners, results)
                if not session.live:
                    continue
                try:
                    self._step(session, owners, results)
                except Exception as e:  # the step failed every row in it
                    log.warning("a decode step of %d rows failed (%r)", session.live, e)
                    for job in results:
                        job.push("error", e)
                    owners.clear()
                    results.clear()
                    session = self.engine.session()
        except BaseException as e:  # never leave requests hanging on a dead worker
            self.error = e
            log.exception("the batching worker failed")
            self.stop(timeout=0)
        finally:
            with self.metrics.lock:
                self.metrics.active_rows = 0

    def _admit(self, session, job: Job, owners: dict, results: dict) -> None:
        """The job's rows join the session at the next step; a row the engine refuses fails
        the job alone (its other rows are withdrawn)."""
        metrics = self.metrics

        def on_token(row: int, token_id: int, text: str) -> bool | None:
            owner, i = owners[row]
            if owner.cancelled:
                return False
            metrics.tokens(1)
            owner.emitted = True
            owner.push("token", i, token_id, text)
            return None

        handles = []
        try:
            for prompt, params in zip(job.prompts, job.params, strict=True):
                handles.append(session.add(prompt, params, on_token))
        except Exception as e:
            for h in handles:
                session.discard(h)
            job.push("error", e)
            return
        for i, h in enumerate(handles):
            owners[h] = (job, i)
        results[job] = [None] * job.rows
        with metrics.lock:
            metrics.prompt_tokens += sum(len(p) for p in job.prompts)

    def _step(self, session, owners: dict, results: dict) -> None:
        metrics = self.metrics
        rows = session.live
        metrics.batch(rows, 0)
        with metrics.lock:
            metrics.active_rows = rows
        for handle, completion in session.step():
            job, i = owners.pop(handle)
            outs = results[job]
            outs[i] = completion
            if all(c is not None for c in outs):
                del results[job]
                job.push("done", outs)
        with metrics.lock:
            metrics.active_rows = session.live
