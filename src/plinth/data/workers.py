"""The worker processes of `prepare_dataset`: an ordered map over tasks, in-process for
`data.workers=1`. `WorkerPool(n).map(fn, tasks)` yields `fn(*task)` for each task, in order.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator


def _worker_init() -> None:
    # each worker is one core; the library's own thread pool would oversubscribe the CPUs
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


class WorkerPool:
    """Ordered map over tasks: in-process for one worker, else a process pool with a bounded
    number of tasks in flight (back-pressure, so reading never runs ahead of memory).

    Workers are forked where the OS can (instant start, and scripts calling prepare_dataset
    need no `if __name__ == "__main__":` guard); they only run numpy, regexes and the Rust
    tokenizer, never torch, so fork is safe here. Elsewhere they are spawned."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pool = None
        if workers > 1:
            methods = mp.get_all_start_methods()
            ctx = mp.get_context("fork" if "fork" in methods else "spawn")
            self.pool = ctx.Pool(workers, initializer=_worker_init)

    def map(self, fn: Callable, tasks: Iterable[tuple]) -> Iterator:
        if self.pool is None:
            for args in tasks:
                yield fn(*args)
            return
        pending: deque = deque()
        for args in tasks:
            pending.append(self.pool.apply_async(fn, args))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
