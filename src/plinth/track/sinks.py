"""Metric sinks: one small logger interface in front of JSONL, TensorBoard, MLflow and W&B.

    logger = MetricLogger(run, open_sinks(cfg.tracking.sinks, run.path, config=cfg_dict))
    logger.log_metrics(step, **{"train/loss": 2.1, "lr": 3e-4})
    logger.log_event(step, "anomaly", type="spike", metric="loss", value=9.0)
    logger.close("finished")

JSONL is always written, through the run directory (`RunDir`), and stays the source of truth
that `plinth report` reads; the other sinks are optional mirrors (the `track` extra):

- `tensorboard`: event files in `RUN_DIR/tensorboard` (`tensorboard --logdir runs`).
- `mlflow`: one MLflow run per plinth run. The store is `$MLFLOW_TRACKING_URI` when set, else a
  local SQLite store `RUN_DIR/mlflow.db` (`mlflow ui --backend-store-uri sqlite:///...`);
  MLflow 3 keeps its plain-file store in maintenance mode, so SQLite is the local default.
  A resumed run logs into the same MLflow run. SQLite stores +-Infinity as +-1.8e308.
- `wandb`: Weights & Biases in offline mode unless `$WANDB_MODE` says otherwise; files go to
  `RUN_DIR/wandb` (`wandb sync RUN_DIR/wandb/offline-run-*` uploads them later). Metrics are
  plotted against a `step` metric rather than W&B's own counter, so the earlier steps logged
  again after a rollback are kept.

Only numbers reach the mirrors (bools become 0/1; None and strings are skipped); non-finite
values are sent as they are. A sink that fails is reported once on stderr, recorded as a
`sink_failed` event and dropped: a tracker outage must not end a training run.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from plinth.errors import UsageError

SINK_NAMES = ("jsonl", "tensorboard", "mlflow", "wandb")


class Sink(Protocol):
    """What a metric sink implements; `MetricLogger` calls these on rank 0 only."""

    name: str

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def log_event(self, step: int, kind: str, details: Mapping[str, Any]) -> None: ...

    def close(self, status: str = "finished") -> None: ...


def numeric(values: Mapping[str, Any]) -> dict[str, float]:
    """The plottable part of a record: numbers and bools as floats (NaN/Inf kept)."""
    out = {}
    for key, value in values.items():
        if key in ("step", "time") or value is None or isinstance(value, str):
            continue
        if isinstance(value, bool | int | float):
            out[key] = float(value)
        elif hasattr(value, "item"):  # numpy / torch scalars
            out[key] = float(value.item())
    return out


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{full}."))
        else:
            flat[full] = value
    return flat


def _details_text(kind: str, details: Mapping[str, Any]) -> str:
    parts = [f"{k}={v}" for k, v in details.items() if k not in ("step", "time", "event")]
    return f"{kind}: " + ", ".join(parts)


class MetricLogger:
    """Writes every record to the run directory's JSONL files and mirrors it to the sinks."""

    def __init__(self, run: Any, sinks: Sequence[Sink] = ()):
        self.run = run  # a plinth.track.run.RunDir (or None on ranks other than 0)
        self.sinks = list(sinks)
        self._event_counts: dict[str, int] = {}

    def log_metrics(self, step: int, /, **values: Any) -> None:
        if self.run is not None:
            self.run.log_metrics(step, **values)
        nums = numeric(values)
        if nums:
            self._each(lambda s: s.log_metrics(step, nums), step)

    def log_event(self, step: int, kind: str, /, **details: Any) -> None:
        if self.run is not None:
            self.run.log_event(step, kind, **details)
        self._event_counts[kind] = self._event_counts.get(kind, 0) + 1
        self._each(lambda s: s.log_event(step, kind, details), step)

    def log_sample(self, step: int, prompt: str, text: str) -> None:
        if self.run is not None:
            self.run.log_sample(step, prompt, text)

    def close(self, status: str = "finished") -> None:
        """Finish the mirrors; status is `finished`, `failed` or `killed` (also recorded as the
        writer's exit in writer.json)."""
        if self.run is not None and hasattr(self.run, "set_exit"):
            self.run.set_exit(status)
        for sink in self.sinks:
            try:
                sink.close(status)
            except Exception as e:
                print(f"warning: closing metric sink {sink.name} failed: {e}", file=sys.stderr)
        self.sinks = []

    def _each(self, call, step: int) -> None:
        for sink in list(self.sinks):
            try:
                call(sink)
            except Exception as e:  # a tracker outage must not end the run
                self.sinks.remove(sink)
                print(f"warning: metric sink {sink.name} failed and is off: {e}", file=sys.stderr)
                if self.run is not None:
                    self.run.log_event(step, "sink_failed", sink=sink.name, error=str(e)[:500])


class TensorBoardSink:
    """Scalars per metric and events as text, in `logdir` (TensorBoard's event-file format)."""

    name = "tensorboard"

    def __init__(self, logdir: str | Path, config: Mapping[str, Any] | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = Path(logdir)
        self.writer = SummaryWriter(str(self.logdir), flush_secs=30)
        if config:
            import yaml

            text = yaml.safe_dump(dict(config), sort_keys=False)
            self.writer.add_text("config", "```\n" + text + "\n```", 0)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        now = time.time()
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step, walltime=now)

    def log_event(self, step: int, kind: str, details: Mapping[str, Any]) -> None:
        self.writer.add_text(f"events/{kind}", _details_text(kind, details), step)

    def close(self, status: str = "finished") -> None:
        self.writer.close()


class MLflowSink:
    """One MLflow run: params from the config, metrics with steps, event counts as metrics."""

    name = "mlflow"

    def __init__(
        self,
        run_dir: str | Path,
        *,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        run_name: str | None = None,
        config: Mapping[str, Any] | None = None,
    ):
        import os

        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        run_dir = Path(run_dir)
        self.tracking_uri = (
            tracking_uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        )
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self._counts: dict[str, int] = {}
        id_file = run_dir / "mlflow_run_id"
        if id_file.exists():  # a resumed plinth run continues its MLflow run
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            return
        name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "plinth"
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(name)
        run = self.client.create_run(
            exp_id, run_name=run_name or run_dir.name, tags={"plinth.run_dir": str(run_dir)}
        )
        self.run_id = run.info.run_id
        id_file.write_text(self.run_id + "\n")
        params = [Param(k[:250], str(v)[:6000]) for k, v in flatten(config or {}).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.client.log_batch(self.run_id, tags=[RunTag("plinth.status", "running")])

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        ms = int(time.time() * 1000)
        batch = [Metric(k, v, ms, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_event(self, step: int, kind: str, details: Mapping[str, Any]) -> None:
        self._counts[kind] = self._counts.get(kind, 0) + 1
        self.client.log_metric(self.run_id, f"events/{kind}", self._counts[kind], step=step)

    def close(self, status: str = "finished") -> None:
        state = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}.get(
            status, "FINISHED"
        )
        self.client.set_tag(self.run_id, "plinth.status", status)
        self.client.set_terminated(self.run_id, state)


class WandbSink:
    """A Weights & Biases run, offline unless $WANDB_MODE says otherwise; files in run_dir."""

    name = "wandb"

    def __init__(
        self,
        run_dir: str | Path,
        *,
        project: str | None = None,
        run_name: str | None = None,
        config: Mapping[str, Any] | None = None,
        mode: str | None = None,
    ):
        import os

        import wandb

        run_dir = Path(run_dir)
        self.run = wandb.init(
            project=project or os.environ.get("WANDB_PROJECT") or "plinth",
            name=run_name or run_dir.name,
            dir=str(run_dir),
            config=dict(config or {}),
            mode=mode or os.environ.get("WANDB_MODE") or "offline",  # type: ignore[arg-type]
            reinit="create_new",
            settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
        )
        # plot against our step, so steps logged again after a rollback are not dropped
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self._counts: dict[str, int] = {}

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log({"step": step, **metrics})

    def log_event(self, step: int, kind: str, details: Mapping[str, Any]) -> None:
        self._counts[kind] = self._counts.get(kind, 0) + 1
        self.run.log({"step": step, f"events/{kind}": self._counts[kind]})

    def close(self, status: str = "finished") -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)


def open_sinks(
    names: Iterable[str],
    run_dir: str | Path,
    *,
    config: Mapping[str, Any] | None = None,
    run_name: str | None = None,
) -> list[Sink]:
    """The optional sinks named in `tracking.sinks` ("jsonl" is always on and needs none)."""
    run_dir = Path(run_dir)
    sinks: list[Sink] = []
    for name in dict.fromkeys(names):
        if name == "jsonl":
            continue
        if name not in SINK_NAMES:
            raise UsageError(f"unknown metric sink {name!r}; choose from {', '.join(SINK_NAMES)}")
        try:
            if name == "tensorboard":
                sinks.append(TensorBoardSink(run_dir / "tensorboard", config=config))
            elif name == "mlflow":
                sinks.append(MLflowSink(run_dir, run_name=run_name, config=config))
            else:
                sinks.append(WandbSink(run_dir, run_name=run_name, config=config))
        except ImportError as e:
            for s in sinks:
                s.close("killed")
            raise UsageError(
                f"tracking.sinks includes {name!r} but its library is missing ({e.name or e}). "
                "Install the tracking extra: pip install 'plinth[track]', or remove "
                f"{name!r} from tracking.sinks."
            ) from None
    return sinks
