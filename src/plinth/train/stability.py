"""Stability guard: decide per optimizer step whether training may go on as is.

    guard = StabilityGuard(cfg.stability)
    decision = guard.observe(step, loss, grad_norm)   # every step, before optimizer.step()
    if decision.action == "skip_step": ...             # zero the grads, do not step

Pure Python and independent of the training loop (no torch): the loop feeds it floats it already
has and acts on the returned `Decision`:

- `ok`: step normally.
- `skip_step`: drop this update (zero the gradients, skip `optimizer.step()`); the weights stay
  as they were, the batch is consumed.
- `rollback`: a persistent blow-up. Restore the newest checkpoint whose step is smaller than
  `decision.bad_since`, fast-forward the data to where it is now (so the batches that caused
  the blow-up are skipped), then call `guard.rolled_back(checkpoint_step)`. With no such
  checkpoint, treat it as `halt`.
- `halt`: stop the run (non-finite values with `on_nonfinite=halt`, or a blow-up after
  `max_rollbacks` rollbacks).

Every detection is a `Detection` with step, metric, value, threshold, window mean/std and the
action taken; log each as `run.log_event(d.step, "anomaly", **d.event())`.

Rules (all thresholds in `StabilityConfig`):

- Non-finite loss or gradient norm -> `skip_step` or `halt`. Non-finite values never enter the
  rolling windows.
- Spike: one-sided rolling z-score. For each watched metric the guard keeps the last `window`
  finite values of steps that were applied; once it holds `min_history` of them, a value with
  `(value - mean) / std > z_threshold` is a spike (only upward moves: a falling loss is good).
  `std` is floored at 0.1% of |mean| so that a perfectly flat history does not flag rounding
  noise. Values of skipped steps are not added to the window, so a spike cannot hide the next.
- Blow-up: `blowup_count` anomalies (spikes or non-finite steps) within `blowup_steps` steps ->
  `rollback`; after `max_rollbacks` rollbacks a further blow-up -> `halt`.
- Stall: `observe_throughput(step, tokens_per_s)` flags a value below `stall_fraction` of the
  median of the last `stall_window` values (once a quarter of that window is filled). It is
  reported once per stall episode (action `log`) and never stops training.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from plinth.config.schema import StabilityConfig

Action = Literal["ok", "skip_step", "rollback", "halt"]
_SEVERITY = {"ok": 0, "log": 0, "skip_step": 1, "rollback": 2, "halt": 3}
_REL_STD_FLOOR = 1e-3


@dataclass(frozen=True)
class Detection:
    """One anomaly: what was seen, against which threshold and window, and what was done."""

    step: int
    kind: str  # "nonfinite" | "spike" | "blowup" | "stall"
    metric: str  # "loss" | "grad_norm" | "tokens_per_s" | "anomalies"
    value: float
    threshold: float | None
    mean: float | None
    std: float | None
    action: str  # "log" | "skip_step" | "rollback" | "halt"

    @property
    def z(self) -> float | None:
        if self.mean is None or not self.std or not math.isfinite(self.value):
            return None
        return (self.value - self.mean) / self.std

    def event(self) -> dict[str, Any]:
        """Details for `run.log_event(step, "anomaly", **details)` (`type` is the kind)."""
        return {
            "type": self.kind,
            "metric": self.metric,
            "value": self.value,
            "threshold": self.threshold,
            "window_mean": self.mean,
            "window_std": self.std,
            "z": self.z,
            "action": self.action,
        }


@dataclass(frozen=True)
class Decision:
    """What the loop should do with this step; `detections` lists why."""

    action: Action = "ok"
    detections: tuple[Detection, ...] = ()
    bad_since: int | None = None
    """For `rollback`: first anomalous step of the burst; restore a checkpoint older than it."""

    @property
    def ok(self) -> bool:
        return self.action == "ok"


OK = Decision()


class _Window:
    """The last `size` finite values with their steps, with O(1) running mean and variance.

    Sums are kept relative to a reference value and recomputed exactly every `size` additions,
    so cancellation and drift stay negligible."""

    def __init__(self, size: int):
        self.size = size
        self.items: deque[tuple[int, float]] = deque()
        self._recompute()

    def _recompute(self) -> None:
        values = [v for _, v in self.items]
        self._ref = math.fsum(values) / len(values) if values else 0.0
        self._sum = math.fsum(v - self._ref for v in values)
        self._sq = math.fsum((v - self._ref) ** 2 for v in values)
        self._adds = 0

    def add(self, step: int, value: float) -> None:
        self.items.append((step, value))
        x = value - self._ref
        self._sum += x
        self._sq += x * x
        if len(self.items) > self.size:
            _, old = self.items.popleft()
            y = old - self._ref
            self._sum -= y
            self._sq -= y * y
        self._adds += 1
        if self._adds >= self.size:
            self._recompute()

    def stats(self) -> tuple[float, float]:
        """Mean and sample standard deviation, floored (see the module doc)."""
        n = len(self.items)
        m = self._sum / n
        var = max(0.0, (self._sq - n * m * m) / (n - 1)) if n > 1 else 0.0
        mean = self._ref + m
        return mean, max(math.sqrt(var), _REL_STD_FLOOR * abs(mean), 1e-12)

    def drop_after(self, step: int) -> None:
        self.items = deque((s, v) for s, v in self.items if s <= step)
        self._recompute()

    def __len__(self) -> int:
        return len(self.items)


class StabilityGuard:
    """Non-finite, spike, blow-up and stall detection for one training run (see module doc)."""

    def __init__(self, cfg: StabilityConfig):
        self.cfg = cfg
        self.windows = {m: _Window(cfg.window) for m in cfg.spike_metrics}
        self.anomaly_steps: deque[int] = deque()
        self.rollbacks = 0
        self.counts: dict[str, int] = {}  # detections by kind, for summaries
        self._throughput: deque[float] = deque(maxlen=cfg.stall_window)
        self._in_stall = False

    # ------------------------------------------------------------------ per optimizer step
    def observe(self, step: int, loss: float, grad_norm: float | None = None) -> Decision:
        """Check one step's loss and (pre-clip) gradient norm; call before `optimizer.step()`."""
        if not self.cfg.enabled:
            return OK
        values = {"loss": float(loss)}
        if grad_norm is not None:
            values["grad_norm"] = float(grad_norm)
        found: list[tuple[str, str, float, float | None, float | None, float | None]] = []
        for metric, value in values.items():
            if not math.isfinite(value):
                found.append(("nonfinite", metric, value, None, None, None))
        if not found:
            for metric, window in self.windows.items():
                if metric not in values or len(window) < self.cfg.min_history:
                    continue
                mean, std = window.stats()
                threshold = mean + self.cfg.z_threshold * std
                if values[metric] > threshold:
                    found.append(("spike", metric, values[metric], threshold, mean, std))

        if not found:
            action: str = "ok"
        elif found[0][0] == "nonfinite":
            action = "halt" if self.cfg.on_nonfinite == "halt" else "skip_step"
        else:
            action = "skip_step" if self.cfg.on_spike == "skip" else "log"

        bad_since = None
        blowup: Detection | None = None
        if found and action != "halt":
            self.anomaly_steps.append(step)
            while self.anomaly_steps and self.anomaly_steps[0] <= step - self.cfg.blowup_steps:
                self.anomaly_steps.popleft()
            if len(self.anomaly_steps) >= self.cfg.blowup_count:
                bad_since = self.anomaly_steps[0]
                action = "rollback" if self.rollbacks < self.cfg.max_rollbacks else "halt"
                blowup = Detection(
                    step,
                    "blowup",
                    "anomalies",
                    float(len(self.anomaly_steps)),
                    float(self.cfg.blowup_count),
                    None,
                    None,
                    action,
                )

        if action in ("ok", "log"):  # the update is applied: its values describe the run
            for metric, window in self.windows.items():
                if metric in values:
                    window.add(step, values[metric])

        taken = "log" if action == "ok" else action
        detections = [
            Detection(step, kind, metric, value, thr, mean, std, taken)
            for kind, metric, value, thr, mean, std in found
        ]
        if blowup is not None:
            detections.append(blowup)
        for d in detections:
            self.counts[d.kind] = self.counts.get(d.kind, 0) + 1
        if not detections:
            return OK
        return Decision(
            action="ok" if action == "log" else action,  # type: ignore[arg-type]
            detections=tuple(detections),
            bad_since=bad_since,
        )

    def rolled_back(self, to_step: int) -> None:
        """The loop restored the checkpoint of `to_step`: forget what came after it."""
        self.rollbacks += 1
        self.anomaly_steps.clear()
        for window in self.windows.values():
            window.drop_after(to_step)
        self._in_stall = False

    # ------------------------------------------------------------------ per log interval
    def observe_throughput(self, step: int, tokens_per_s: float) -> Decision:
        """Check throughput (call at each log step); a stall is reported once, action `log`."""
        if not self.cfg.enabled or not math.isfinite(tokens_per_s) or tokens_per_s < 0:
            return OK
        history = self._throughput
        detection = None
        if len(history) >= max(4, self.cfg.stall_window // 4):
            median = statistics.median(history)
            threshold = self.cfg.stall_fraction * median
            if tokens_per_s < threshold:
                if not self._in_stall:
                    std = statistics.pstdev(history)
                    detection = Detection(
                        step, "stall", "tokens_per_s", tokens_per_s, threshold, median, std, "log"
                    )
                    self.counts["stall"] = self.counts.get("stall", 0) + 1
                self._in_stall = True
            else:
                self._in_stall = False
        history.append(tokens_per_s)
        return OK if detection is None else Decision("ok", (detection,))

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """JSON-able state; keep it in the checkpoint so the rollback bound survives restarts."""
        return {
            "windows": {m: list(w.items) for m, w in self.windows.items()},
            "anomaly_steps": list(self.anomaly_steps),
            "rollbacks": self.rollbacks,
            "counts": dict(self.counts),
            "throughput": list(self._throughput),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for metric, items in state.get("windows", {}).items():
            if metric in self.windows:
                for s, v in items:
                    self.windows[metric].add(int(s), float(v))
        self.anomaly_steps = deque(int(s) for s in state.get("anomaly_steps", []))
        self.rollbacks = int(state.get("rollbacks", 0))
        self.counts = dict(state.get("counts", {}))
        self._throughput.extend(float(v) for v in state.get("throughput", []))
