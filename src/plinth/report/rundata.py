"""Read one run directory into plain Python data: the only input of reports and comparisons.

Everything is read defensively: a run that is still going, was killed mid-write (torn last
JSONL line), never wrote a config, or carries fields this version does not know still loads.

Status rule (`run_status`):

- `finished`: an `end` event after the last `start` event.
- `halted`: the stability guard stopped it (an `anomaly` event with action `halt` after the
  last `start`), with or without an `end` event.
- `running`: no `end` yet and the writer recorded in writer.json is alive (its pid on this
  machine, its heartbeat elsewhere: plinth.track.writer).
- `killed`: no `end` and the writer is gone without saying why (SIGKILL, lost node, OOM
  killer) or stopped it on purpose (Ctrl-C, `stop_after`): resumable from its last checkpoint.
- `crashed`: no `end` and the writer ended with an error.

Runs without a writer.json (written by older versions) fall back to record times: `running`
while the newest record (metrics, events or system samples) is younger than max(10 minutes,
5 x the median interval between its metric records), `crashed` after that.

Results of `plinth eval` on a run live in RUN/evals.jsonl (older versions appended them to
events.jsonl as task_eval / lm_eval events carrying a `model`; those are moved to `evals` on
load), so they never count as training time.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from plinth.config.yamlio import safe_load
from plinth.track.checkpoints import checkpoint_step, list_checkpoints
from plinth.track.run import EVALS_FILE, read_jsonl
from plinth.track.writer import read_writer, writer_alive

STALE_AFTER_S = 600.0
STATUSES = ("running", "finished", "killed", "crashed", "halted")
EVAL_EVENTS = ("task_eval", "lm_eval")
RUN_FILES = ("metrics.jsonl", "events.jsonl", "manifest.json", "config.yaml")


@dataclass
class ConfigLine:
    """One line of config.yaml: `key` is dotted (None for lines that are not key: value)."""

    indent: int
    text: str  # the line without its source comment
    key: str | None
    source: str | None  # "file x.yaml", "command line", ... for non-default values


@dataclass
class Run:
    path: Path
    config: dict = field(default_factory=dict)
    config_lines: list[ConfigLine] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)  # metrics.jsonl, file order
    events: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    system: list[dict] = field(default_factory=list)
    checkpoints: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)  # `plinth eval` results (evals.jsonl)
    writer: dict = field(default_factory=dict)  # writer.json
    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    def _cached(self, key: tuple, compute):
        """Memoise derived data; the key changes whenever the record lists do."""
        full = (
            key,
            id(self.records),
            len(self.records),
            id(self.events),
            len(self.events),
            len(self.system),
        )
        if full not in self._memo:
            self._memo[full] = compute()
        return self._memo[full]

    @property
    def name(self) -> str:
        return self.path.name

    def config_value(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    # ------------------------------------------------------------------ series
    def series(self, key: str) -> list[dict]:
        """Records carrying `key`, keeping only the final trajectory: when a resume or rollback
        logs a step again, the earlier records from that step on are superseded."""
        return self._cached(("series",), self._all_series).get(key, [])

    def _all_series(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for rec in self.records:  # one pass for every key: long runs have many records
            step = rec.get("step")
            if not isinstance(step, int | float) or isinstance(step, bool):
                continue
            point = None
            for key, value in rec.items():
                if key in ("step", "time") or not isinstance(value, int | float):
                    continue
                if point is None:
                    point = (step, rec.get("time"), rec.get("tokens"))
                pts = out.setdefault(key, [])
                while pts and pts[-1]["step"] >= step:
                    pts.pop()
                pts.append(
                    {"step": step, "value": float(value), "time": point[1], "tokens": point[2]}
                )
        return out

    def numeric_keys(self) -> list[str]:
        """Keys with numeric values, in order of first appearance."""
        return list(self._cached(("series",), self._all_series))

    def last_event(self, kind: str) -> dict | None:
        for ev in reversed(self.events):
            if ev.get("event") == kind:
                return ev
        return None

    def events_since_last_start(self) -> list[dict]:
        idx = 0
        for i, ev in enumerate(self.events):
            if ev.get("event") == "start":
                idx = i
        return self.events[idx:]

    # ------------------------------------------------------------------ time
    def last_record_time(self) -> float | None:
        times = [
            r["time"]
            for src in (self.records, self.events, self.system)
            for r in src[-5:]
            if isinstance(r.get("time"), int | float)
        ]
        return max(times) if times else None

    def segments(self) -> list[tuple[float, float]]:
        """(begin, end) wall-clock spans in which the run was alive, split at `start` events
        (a resume starts a new span; the time between spans is not run time)."""
        return self._cached(("segments",), self._segments)

    def _segments(self) -> list[tuple[float, float]]:
        times = sorted(
            r["time"]
            for src in (self.records, self.events, self.system)
            for r in src
            if finite(r.get("time"))
        )
        if not times:
            return []
        starts = sorted(
            ev["time"]
            for ev in self.events
            if ev.get("event") == "start" and finite(ev.get("time"))
        )
        bounds = [min(times[0], starts[0]), *starts[1:]] if starts else [times[0]]
        spans = []
        for i, begin in enumerate(bounds):
            stop = bounds[i + 1] if i + 1 < len(bounds) else math.inf
            inside = [t for t in times if begin <= t < stop]
            spans.append((begin, inside[-1] if inside else begin))
        return spans

    def wall_seconds(self) -> float:
        return sum(end - begin for begin, end in self.segments())

    # ------------------------------------------------------------------ summaries
    @property
    def devices(self) -> int:
        ws = self.manifest.get("world_size")
        return int(ws) if isinstance(ws, int) and ws > 0 else 1

    @property
    def total_steps(self) -> int | None:
        ev = self.last_event("start")
        ts = ev.get("total_steps") if ev else None
        return ts if isinstance(ts, int) else None

    @property
    def last_step(self) -> int | None:
        """Step of the newest record (after a rollback this is not the largest step)."""
        last = [src[-1] for src in (self.records, self.events) if src]
        last = [r for r in last if isinstance(r.get("step"), int)]
        if not last:
            return None
        return max(last, key=lambda r: r["time"] if finite(r.get("time")) else -math.inf)["step"]


def finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def parse_config_lines(text: str) -> list[ConfigLine]:
    """Lines of a config.yaml written by `render_yaml`, with the `# source` comments split off."""
    lines: list[ConfigLine] = []
    stack: list[tuple[int, str]] = []
    for raw in text.splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        indent = len(raw) - len(raw.lstrip(" "))
        body, source = _split_comment(raw)
        m = re.match(r"^\s*([^\s:#][^:]*?):(?:\s+(.*))?$", body)
        key = None
        if m:
            while stack and stack[-1][0] >= indent:
                stack.pop()
            key = ".".join([k for _, k in stack] + [m.group(1)])
            if not (m.group(2) or "").strip():  # a section header
                stack.append((indent, m.group(1)))
        lines.append(ConfigLine(indent, body.rstrip(), key, source))
    return lines


def _split_comment(line: str) -> tuple[str, str | None]:
    """("key: value", "source") when the line ends in a YAML comment, else (line, None)."""
    if "#" not in line:
        return line, None
    try:
        whole = safe_load(line.strip())
    except yaml.YAMLError:
        return line, None
    for m in re.finditer(r"\s#\s?", line):
        head = line[: m.start()]
        try:
            if safe_load(head.strip()) == whole:
                return head, line[m.end() :].strip() or None
        except yaml.YAMLError:
            continue
    return line, None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _file_sizes(directory: Path) -> dict[str, int]:
    """Size of every file under a checkpoint directory, keyed by its path relative to it as
    meta.json names them (`ranks/rank_00000.pt`, `sharded/__0_0.distcp`): sub-directories
    count."""
    out = {}
    for f in sorted(directory.rglob("*")):
        try:
            if f.is_file() and not f.is_symlink():
                out[f.relative_to(directory).as_posix()] = f.stat().st_size
        except OSError:
            continue
    return out


def _checkpoints(path: Path, events: list[dict]) -> list[dict]:
    found: dict[int, dict] = {}
    ckdir = path / "checkpoints"
    if ckdir.is_dir():
        for d in list_checkpoints(ckdir):
            step = checkpoint_step(d.name)
            meta = _read_json(d / "meta.json")
            files = _file_sizes(d)
            expected = meta.get("files") if isinstance(meta.get("files"), dict) else {}
            complete = bool(meta) and all(
                isinstance(info, dict) and files.get(str(n)) == info.get("bytes")
                for n, info in expected.items()
            )
            found[step] = {
                "step": step,
                "name": d.name,
                "on_disk": True,
                "bytes": sum(files.values()),
                "complete": complete,
                # numbers only: a LoRA checkpoint's meta also names its base and weights kind
                "metrics": {k: v for k, v in meta.items() if k not in ("files", "step")
                            and isinstance(v, int | float) and not isinstance(v, bool)},
                "time": None,
            }
    for ev in events:
        if ev.get("event") != "checkpoint" or not isinstance(ev.get("step"), int):
            continue
        details = {k: v for k, v in ev.items() if k not in ("step", "time", "event", "path")}
        entry = found.setdefault(
            ev["step"],
            {
                "step": ev["step"],
                "name": Path(str(ev.get("path", ""))).name or None,
                "on_disk": False,
                "bytes": None,
                "complete": None,
                "metrics": details,
            },
        )
        entry["time"] = ev.get("time")
        if not entry["metrics"]:
            entry["metrics"] = details
    return [found[k] for k in sorted(found)]


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in RUN_FILES)


def _is_eval_record(e: dict) -> bool:
    """A `plinth eval` result (it names the model it scored; the training loop's own
    task_eval events do not)."""
    return e.get("event") in EVAL_EVENTS and "model" in e


def load_run(path: str | Path) -> Run:
    """Everything `plinth report` needs from one run directory."""
    p = Path(path)
    if not p.is_dir():
        from plinth.errors import UsageError

        raise UsageError(f"{p} is not a directory; give a run directory such as runs/<name>")
    if not is_run_dir(p):
        from plinth.errors import UsageError

        raise UsageError(
            f"{p} holds none of {', '.join(RUN_FILES)}: not a plinth run directory. "
            "`plinth runs` lists the runs under a directory."
        )
    run = Run(p)
    cfg_path = p / "config.yaml"
    if cfg_path.is_file():
        text = cfg_path.read_text(encoding="utf-8")
        try:
            loaded = safe_load(text)
            run.config = loaded if isinstance(loaded, dict) else {}
        except yaml.YAMLError:
            run.config = {}
        run.config_lines = parse_config_lines(text)
    run.manifest = _read_json(p / "manifest.json")
    run.records = [r for r in read_jsonl(p / "metrics.jsonl") if isinstance(r, dict)]
    events = [r for r in read_jsonl(p / "events.jsonl") if isinstance(r, dict)]
    run.events = [e for e in events if not _is_eval_record(e)]
    run.evals = [e for e in events if _is_eval_record(e)]  # older runs kept them there
    run.evals += [r for r in read_jsonl(p / EVALS_FILE) if isinstance(r, dict)]
    run.writer = read_writer(p)
    run.samples = [r for r in read_jsonl(p / "samples.jsonl") if isinstance(r, dict)]
    run.system = [r for r in read_jsonl(p / "system.jsonl") if isinstance(r, dict)]
    run.checkpoints = _checkpoints(p, run.events)
    return run


def run_status(run: Run, now: float | None = None) -> str:
    """running / finished / crashed / halted (see the module docstring for the rule)."""
    recent = run.events_since_last_start()
    if any(e.get("event") == "anomaly" and e.get("action") == "halt" for e in recent):
        return "halted"
    if any(e.get("event") == "end" for e in recent):
        return "finished"
    alive = writer_alive(run.writer, now)
    if alive is not None:
        if alive:
            return "running"
        return "crashed" if run.writer.get("exit") == "failed" else "killed"
    last = run.last_record_time()
    if last is None:
        try:
            last = max(f.stat().st_mtime for f in run.path.iterdir() if f.is_file())
        except ValueError:
            return "crashed"
    times = [r["time"] for r in run.records[-50:] if finite(r.get("time"))]
    gaps = [b - a for a, b in itertools.pairwise(times) if b > a]
    interval = statistics.median(gaps) if gaps else 0.0
    stale = max(STALE_AFTER_S, 5 * interval)
    now = time.time() if now is None else now
    return "running" if now - last <= stale else "crashed"


def summarize(run: Run, now: float | None = None) -> dict[str, Any]:
    """Headline numbers of a run (status card, `plinth runs`, comparison tables)."""
    from plinth.track.sampler import compute_hours

    loss = [p["value"] for p in run.series("train/loss")]
    finite_loss = [v for v in loss if math.isfinite(v)]
    val = [p for p in run.series("val/loss") if math.isfinite(p["value"])]
    tps = [p["value"] for p in run.series("tokens_per_s") if math.isfinite(p["value"])]
    mfu = [p["value"] for p in run.series("mfu") if math.isfinite(p["value"])]
    mem = [p["value"] for p in run.series("mem_mb") if math.isfinite(p["value"])]
    gpu_mem = [v for r in run.system for k, v in r.items() if k.endswith("/mem_mb") and finite(v)]
    tokens = [p["value"] for p in run.series("tokens") if math.isfinite(p["value"])]
    wall = run.wall_seconds()
    tail = max(1, len(finite_loss) // 20)
    git = run.manifest.get("git") if isinstance(run.manifest.get("git"), dict) else {}
    data = run.manifest.get("data") if isinstance(run.manifest.get("data"), dict) else {}
    start = run.last_event("start") or {}
    return {
        "name": run.name,
        "status": run_status(run, now),
        "created": run.manifest.get("created") or (run.segments() or [(None, None)])[0][0],
        "step": run.last_step,
        "total_steps": run.total_steps,
        "tokens": tokens[-1] if tokens else None,
        "wall_s": wall,
        "compute_h": compute_hours(run.devices, wall),
        "devices": run.devices,
        "train_loss": finite_loss[-1] if finite_loss else None,
        "train_loss_tail": statistics.fmean(finite_loss[-tail:]) if finite_loss else None,
        "best_train_loss": min(finite_loss) if finite_loss else None,
        "val_loss": val[-1]["value"] if val else None,
        "best_val_loss": min(p["value"] for p in val) if val else None,
        "tokens_per_s": statistics.median(tps[-20:]) if tps else None,
        "mfu": statistics.median(mfu[-20:]) if mfu else None,
        "peak_mem_mb": max(mem) if mem else None,
        "peak_gpu_mem_mb": max(gpu_mem) if gpu_mem else None,
        "git_sha": git.get("sha"),
        "git_dirty": git.get("dirty"),
        "data_fingerprint": data.get("fingerprint"),
        "params": start.get("params"),
        "device": start.get("device") or (run.manifest.get("hardware") or {}).get("device"),
        "last_record_age_s": (time.time() if now is None else now) - (run.last_record_time() or 0),
    }


# Metric direction, the one home for it (compare's deltas, report highlights): names are split
# into words (`val/ppl` -> val, ppl; `bits_per_byte` -> bits, per, byte), and a name with any
# of these words is better when smaller ...
LOWER_IS_BETTER = frozenset({
    "loss", "losses", "ppl", "perplexity", "bpb", "bits", "nll", "ece", "brier", "toxicity",
    "toxic", "drop", "mae", "mse", "rmse", "error", "errors", "err", "wer", "cer", "mem",
    "memory",
})
# ... or has no better direction (bias gaps, preference rates: their sign is the finding)
NEUTRAL = frozenset({"gap", "prefer", "preferred", "truncated"})
# summary keys whose words would mislead: counts and costs are neither better nor worse
_DIRECTION = {
    "step": 0, "steps": 0, "tokens": 0, "wall_s": 0, "compute_h": 0, "devices": 0,
    "params": 0, "tokens_per_s": 1, "mfu": 1,
}


def metric_direction(name: str) -> int:
    """-1 when a smaller value of this metric is better, +1 when larger is, 0 neither. `name`
    is a metric key (`val/bpb`, `train_loss_tail`) or an evaluation ("<task> <metric>")."""
    if name in _DIRECTION:
        return _DIRECTION[name]
    metric = name.rsplit(" ", 1)[-1]
    words = set(re.split(r"[^a-z0-9]+", metric.lower()))
    if words & NEUTRAL:
        return 0
    return -1 if words & LOWER_IS_BETTER else 1


def evaluations(run: Run) -> dict[str, float]:
    """The latest score of every evaluation a run holds, keyed "<task> <metric>": tasks scored
    during training (the last `eval/<task>/<metric>` point), `plinth eval` results on the run
    (the newest task_eval event per task; lm_eval events by source), and the last val/ metrics."""
    out: dict[str, float] = {}
    for key in run.numeric_keys():
        if key.startswith(("eval/", "val/")):
            pts = [p for p in run.series(key) if math.isfinite(p["value"])]
            if pts:
                name = key.split("/", 1)[1].replace("/", " ") if key.startswith("eval/") else key
                out[name] = pts[-1]["value"]
    for e in run.evals:
        if e.get("event") == "task_eval" and "task" in e:
            for metric, v in (e.get("metrics") or {}).items():
                if finite(v):
                    out[f"{e['task']} {metric}"] = float(v)
        elif e.get("event") == "lm_eval" and "source" in e:
            src = Path(str(e["source"])).name
            for metric in ("perplexity", "bits_per_byte"):
                if finite(e.get(metric)):
                    out[f"{src} {metric}"] = float(e[metric])
    return out


def eval_direction(key: str) -> int:
    """The direction of an evaluation "<task> <metric>" (see `metric_direction`)."""
    return metric_direction(key)


def health(run: Run) -> dict[str, int]:
    """Counts for the health summary: non-finite steps, skips, rollbacks, spikes, ..."""
    nonfinite_steps = set()
    for key in ("train/loss", "grad_norm"):
        for p in run.series(key):
            if not math.isfinite(p["value"]):
                nonfinite_steps.add(p["step"])
    counts = {
        "nonfinite": 0,
        "skipped": 0,
        "rollbacks": 0,
        "spikes": 0,
        "stalls": 0,
        "blowups": 0,
        "resumes": 0,
        "checkpoints_skipped": 0,
        "sink_failures": 0,
    }
    rollback_events = 0
    skipped_steps: set = set()
    for ev in run.events:
        kind = ev.get("event")
        if kind == "anomaly":
            typ, action = ev.get("type") or ev.get("kind"), ev.get("action")
            if typ == "nonfinite":
                nonfinite_steps.add(ev.get("step"))
            elif typ == "spike":
                counts["spikes"] += 1
            elif typ == "stall":
                counts["stalls"] += 1
            elif typ == "blowup":
                counts["blowups"] += 1
            if action == "skip_step":
                skipped_steps.add(ev.get("step"))
        elif kind == "rollback":
            rollback_events += 1
        elif kind == "resume":
            counts["resumes"] += 1
        elif kind == "checkpoint_skipped":
            counts["checkpoints_skipped"] += 1
        elif kind == "sink_failed":
            counts["sink_failures"] += 1
    counts["nonfinite"] = len(nonfinite_steps)
    counts["rollbacks"] = rollback_events
    counts["skipped"] = len(skipped_steps)
    return counts
