"""The stability guard: NaN and spike injection, blow-up -> rollback with a bound, stalls."""

from __future__ import annotations

import json
import math
import random

import pytest
from pydantic import ValidationError

from plinth.config.schema import Config, StabilityConfig
from plinth.train.stability import StabilityGuard


def healthy(n: int, seed: int = 0, start: float = 4.0):
    """A falling, noisy loss and a noisy grad norm, like a healthy run."""
    rng = random.Random(seed)
    for i in range(n):
        loss = start * math.exp(-i / 2000) + 0.05 * rng.gauss(0, 1)
        grad = 1.0 + 0.1 * rng.gauss(0, 1)
        yield i + 1, loss, grad


def feed(guard: StabilityGuard, n: int, seed: int = 0):
    decisions = [guard.observe(s, loss, g) for s, loss, g in healthy(n, seed)]
    return decisions


def test_config_section_defaults_and_validation():
    cfg = Config().stability
    assert (cfg.window, cfg.z_threshold, cfg.min_history) == (128, 6.0, 64)
    assert cfg.on_nonfinite == "skip"
    with pytest.raises(ValidationError, match="min_history"):
        StabilityConfig(window=16, min_history=32)
    with pytest.raises(ValidationError):
        StabilityConfig(on_nonfinite="ignore")


def test_healthy_run_has_no_detections():
    guard = StabilityGuard(StabilityConfig())
    decisions = feed(guard, 3000)
    assert all(d.ok and not d.detections for d in decisions)
    assert guard.counts == {}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_loss_skips_and_stays_out_of_the_window(bad):
    guard = StabilityGuard(StabilityConfig())
    feed(guard, 200)
    before = guard.windows["loss"].stats()
    d = guard.observe(201, bad, 1.0)
    assert d.action == "skip_step"
    (det,) = d.detections
    assert (det.kind, det.metric, det.step, det.action) == ("nonfinite", "loss", 201, "skip_step")
    assert math.isnan(det.value) if math.isnan(bad) else det.value == bad
    assert guard.windows["loss"].stats() == before  # the window did not see the NaN
    assert guard.windows["grad_norm"].items[-1][0] == 200  # nor the grad of the skipped step
    assert guard.observe(202, 3.5, 1.0).ok


def test_nonfinite_grad_and_halt_mode():
    guard = StabilityGuard(StabilityConfig(on_nonfinite="halt"))
    d = guard.observe(1, 2.0, math.nan)
    assert d.action == "halt"
    assert [(x.kind, x.metric) for x in d.detections] == [("nonfinite", "grad_norm")]
    both = guard.observe(2, math.inf, math.nan)
    assert {x.metric for x in both.detections} == {"loss", "grad_norm"}


def test_spike_detected_with_window_stats_and_not_before_min_history():
    guard = StabilityGuard(StabilityConfig())
    assert guard.observe(1, 3.0, 1.0).ok
    for s in range(2, 50):
        guard.observe(s, 3.0, 1.0)
    assert guard.observe(50, 100.0, 1.0).ok  # 49 values of history < min_history 64
    guard = StabilityGuard(StabilityConfig())
    feed(guard, 300)
    values = [v for _, v in guard.windows["loss"].items]
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    d = guard.observe(301, mean + 10 * std, 1.0)
    assert d.action == "skip_step"
    (det,) = d.detections
    assert det.kind == "spike" and det.metric == "loss"
    assert det.mean == pytest.approx(mean) and det.std == pytest.approx(std)
    assert det.threshold == pytest.approx(mean + 6 * std)
    assert det.z == pytest.approx(10, rel=1e-6)
    event = det.event()
    assert set(event) >= {"type", "metric", "value", "threshold", "window_mean", "window_std"}
    json.dumps(event)  # plain data, ready for events.jsonl


def test_spikes_are_one_sided_and_grad_norm_is_watched():
    guard = StabilityGuard(StabilityConfig())
    feed(guard, 300)
    assert guard.observe(301, -50.0, 1.0).ok  # a sudden drop is not an anomaly
    d = guard.observe(302, 3.0, 50.0)
    assert [(x.kind, x.metric) for x in d.detections] == [("spike", "grad_norm")]
    only_loss = StabilityGuard(StabilityConfig(spike_metrics=["loss"]))
    feed(only_loss, 300)
    assert only_loss.observe(301, 3.0, 50.0).ok


def test_skipped_spike_stays_out_of_window_but_logged_spike_enters():
    skip = StabilityGuard(StabilityConfig())
    log = StabilityGuard(StabilityConfig(on_spike="log"))
    for g in (skip, log):
        feed(g, 300)
    assert skip.observe(301, 50.0, 1.0).action == "skip_step"
    d = log.observe(301, 50.0, 1.0)
    assert d.action == "ok" and d.detections[0].action == "log"
    assert skip.windows["loss"].items[-1][1] != 50.0
    assert log.windows["loss"].items[-1][1] == 50.0


def test_persistent_blowup_rolls_back_then_halts_after_the_bound():
    cfg = StabilityConfig(max_rollbacks=2, blowup_count=4, blowup_steps=32)
    guard = StabilityGuard(cfg)
    feed(guard, 300)
    window_before = list(guard.windows["loss"].items)
    actions = []
    for k, step in enumerate(range(301, 311)):
        d = guard.observe(step, 50.0 + k, 1.0)
        actions.append(d.action)
        if d.action == "rollback":
            break
    assert actions == ["skip_step"] * 3 + ["rollback"]
    assert d.bad_since == 301
    blow = [x for x in d.detections if x.kind == "blowup"]
    assert blow and blow[0].value == 4 and blow[0].threshold == 4 and blow[0].action == "rollback"
    guard.rolled_back(250)
    assert guard.rollbacks == 1
    assert all(s <= 250 for s, _ in guard.windows["loss"].items)
    assert list(guard.windows["loss"].items) == [x for x in window_before if x[0] <= 250]

    def blow_up(first: int) -> str:
        d = None
        for step in range(first, first + 4):
            d = guard.observe(step, 80.0, 1.0)
        return d.action

    # replayed steps after the rollback are healthy again; then two more blow-ups
    for s, loss, g in healthy(50, seed=3, start=3.8):
        assert guard.observe(250 + s, loss, g).ok
    assert blow_up(400) == "rollback"
    guard.rolled_back(380)
    assert blow_up(500) == "halt"
    assert guard.rollbacks == 2
    assert guard.counts["blowup"] == 3


def test_zero_rollbacks_halts_and_spread_out_spikes_never_roll_back():
    guard = StabilityGuard(StabilityConfig(max_rollbacks=0, blowup_count=2))
    feed(guard, 300)
    guard.observe(301, 50.0, 1.0)
    assert guard.observe(302, 50.0, 1.0).action == "halt"

    guard = StabilityGuard(StabilityConfig())
    step = 0
    for step, loss, g in healthy(300):
        guard.observe(step, loss, g)
    for _ in range(10):  # one spike every 40 steps: never 4 within 32
        for _ in range(39):
            step += 1
            guard.observe(step, 3.0, 1.0 + 0.1 * math.sin(step))
        step += 1
        assert guard.observe(step, 500.0, 1.0).action == "skip_step"
    assert guard.rollbacks == 0 and "blowup" not in guard.counts


def test_nonfinite_steps_count_toward_blowup():
    guard = StabilityGuard(StabilityConfig())
    actions = [guard.observe(s, math.nan, math.nan).action for s in range(1, 5)]
    assert actions == ["skip_step"] * 3 + ["rollback"]


def test_throughput_stall_reported_once_per_episode():
    guard = StabilityGuard(StabilityConfig(stall_window=32, stall_fraction=0.25))
    rng = random.Random(1)
    seq = [1000 + 50 * rng.gauss(0, 1) for _ in range(40)]
    seq += [100.0, 90.0, 120.0]  # a stall lasting three log records
    seq += [1000.0] * 5
    seq += [50.0]  # a second stall
    found = []
    for i, tps in enumerate(seq):
        d = guard.observe_throughput(10 * (i + 1), tps)
        assert d.action == "ok"  # stalls never stop training
        found += d.detections
    assert [(x.step, x.kind, x.metric, x.action) for x in found] == [
        (410, "stall", "tokens_per_s", "log"),
        (490, "stall", "tokens_per_s", "log"),
    ]
    assert found[0].threshold == pytest.approx(0.25 * found[0].mean)
    assert found[0].mean == pytest.approx(1000, abs=40)
    short = StabilityGuard(StabilityConfig())
    assert short.observe_throughput(10, 1000).ok
    assert not short.observe_throughput(20, 1).detections  # too little history to judge


def test_disabled_guard_never_intervenes():
    guard = StabilityGuard(StabilityConfig(enabled=False))
    assert guard.observe(1, math.nan, math.inf).ok
    assert guard.observe_throughput(1, 0.0).ok


def test_state_dict_round_trips_through_json():
    guard = StabilityGuard(StabilityConfig(max_rollbacks=1))
    feed(guard, 200)
    for s in range(201, 205):
        guard.observe(s, 99.0, 1.0)
    guard.rolled_back(150)
    for tps in (1000.0,) * 10:
        guard.observe_throughput(1, tps)
    state = json.loads(json.dumps(guard.state_dict()))
    resumed = StabilityGuard(StabilityConfig(max_rollbacks=1))
    resumed.load_state_dict(state)
    assert resumed.rollbacks == 1
    assert list(resumed.windows["loss"].items) == [tuple(x) for x in guard.windows["loss"].items]
    for s in range(300, 304):  # the bound survives the restart: the next blow-up halts
        d = resumed.observe(s, 99.0, 1.0)
    assert d.action == "halt"


def test_running_window_statistics_are_exact():
    import statistics

    from plinth.train.stability import _Window

    rng = random.Random(0)
    window, values = _Window(128), []
    for i in range(3000):
        v = 50 + 20 * math.sin(i / 300) + rng.gauss(0, 5)  # drifting level, large offset
        window.add(i, v)
        values.append(v)
    mean, std = window.stats()
    assert mean == pytest.approx(statistics.fmean(values[-128:]), rel=1e-12)
    assert std == pytest.approx(statistics.stdev(values[-128:]), rel=1e-9)
    window.drop_after(2950)
    kept = values[2950 - 127 : 2951]
    assert len(window) == 128 - 49
    assert window.stats()[0] == pytest.approx(statistics.fmean(kept[-len(window) :]), rel=1e-12)
