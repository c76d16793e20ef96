"""`plinth compare`: config/version diff, final metrics with deltas, divergence beyond noise."""

from __future__ import annotations

import json
import re

import pytest

from plinth.cli import main
from plinth.report.compare import comparison, config_diff, divergence, render_compare
from plinth.report.rundata import load_run
from plinth.report.synthetic import write_synthetic_run
from plinth.track.run import RunDir, append_evals


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    paths = {
        "base": write_synthetic_run(root / "base", seed=1),
        # same recipe, other noise: no real difference
        "twin": write_synthetic_run(root / "twin", seed=2),
        # loss 0.6 higher from step 300 on (~3.5 sigma of the per-point gap), other lr and data
        "shifted": write_synthetic_run(
            root / "shifted",
            seed=3,
            offset=(300, 0.6),
            overrides=("optim.lr=0.006", "tracking.log_every=1"),
            data_fingerprint="sha256:other",
            git_sha="f" * 40,
        ),
        # one huge spike only
        "spiky": write_synthetic_run(root / "spiky", seed=4, spike_steps=[350]),
        # logs every 5 steps: compared by interpolation
        "sparse": write_synthetic_run(root / "sparse", seed=5, log_every=5, offset=(400, -0.4)),
    }
    return {k: load_run(v) for k, v in paths.items()}


def test_divergence_found_near_the_change(runs):
    dv = divergence(runs["base"], runs["shifted"])
    assert dv["diverged"] and dv["axis"] == "tokens"
    assert 300 <= dv["step"] <= 312  # within about one window of the true change
    assert dv["tokens"] == dv["step"] * 4096
    assert dv["delta"] == pytest.approx(0.6, abs=0.15)
    assert dv["sigma"] > 0


def test_no_divergence_for_noise_or_a_single_spike(runs):
    for name in ("twin", "spiky"):
        dv = divergence(runs["base"], runs[name])
        assert not dv["diverged"], name
        assert dv["reason"] == "within noise over the whole overlap"
        assert dv["points"] == 600


def test_divergence_with_other_logging_interval_and_downwards(runs):
    dv = divergence(runs["base"], runs["sparse"])
    assert dv["diverged"] and dv["delta"] < 0
    assert 400 <= dv["step"] <= 420


def test_divergence_needs_overlap(tmp_path, runs):
    short = RunDir(tmp_path / "short")
    for s in range(1, 6):
        short.log_metrics(s, tokens=s * 4096, **{"train/loss": 5.0})
    short.close()
    dv = divergence(runs["base"], load_run(short.path))
    assert not dv["diverged"] and "overlapping points" in dv["reason"]


def test_config_and_version_diff(runs):
    diff = dict(config_diff([runs["base"], runs["shifted"]]))
    assert diff == {"optim.lr": [0.003, 0.006]}
    assert config_diff([runs["base"], runs["twin"]]) == []
    result = comparison([runs["base"], runs["shifted"], runs["twin"]])
    differs = {what: values for what, values, d in result["versions"] if d}
    assert differs["git SHA"][1] == "f" * 40
    assert differs["data fingerprint"] == [
        "sha256:5f1e0c9a2b7d",
        "sha256:other",
        "sha256:5f1e0c9a2b7d",
    ]
    assert "python" not in differs
    assert result["divergence"][0] is None
    assert result["divergence"][1]["diverged"] and not result["divergence"][2]["diverged"]


def test_compare_page_and_cli(runs, tmp_path, capsys):
    a, b = runs["base"].path, runs["shifted"].path
    out = tmp_path / "cmp.html"
    assert main(["compare", str(a), str(b), "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "optim.lr" in text and "0.006" in text
    assert re.search(r"shifted vs base: loss diverges at step 3\d\d", text)
    assert "sha256:other" in text  # data version difference
    assert re.search(r"final train loss.*\+0\.\d+ \(\+\d+\.\d%\)", text)
    html = out.read_text()
    data = json.loads(re.search(r'id="plinth-data">(.*?)</script>', html, re.S).group(1))
    ids = [c["id"] for c in data["charts"]]
    assert ids[:2] == ["train-loss", "val-loss"] and "loss-gap" in ids
    assert [s["label"] for s in data["charts"][0]["series"]] == ["base", "shifted"]
    for s in data["charts"][0]["series"]:
        assert s["x"]["tokens"] and s["x"]["time"]  # every curve on all three axes
    assert any(m["kind"] == "diverge" for m in data["markers"])
    assert "Config differences" in html and "sha256:other" in html
    # default output goes next to the first run
    assert main(["compare", str(a), str(runs["twin"].path)]) == 0
    assert (a.parent / "compare-base-vs-twin.html").exists()
    assert "no divergence" in capsys.readouterr().out
    assert main(["compare", str(a)]) == 2


def test_page_escapes_run_content(runs):
    html = render_compare([runs["base"], runs["twin"]], comparison([runs["base"], runs["twin"]]))
    assert "<script>alert" not in html
    assert html.count("<script") == 3  # data, uPlot, our chart code


def test_evaluations_side_by_side(tmp_path, capsys):
    """In-training task scores (eval/<task>/<metric>), plinth eval results (task_eval events,
    newest per task) and lm_eval perplexity appear per run with deltas in the right direction."""
    from plinth.report.compare import eval_rows

    paths = []
    for name, acc, ece, bpb in (("a", 0.40, 0.20, 1.5), ("b", 0.55, 0.10, 1.7)):
        p = write_synthetic_run(tmp_path / name, seed=1, steps=50)
        run = RunDir(p, heartbeat=False)  # appends
        run.log_metrics(50, **{"eval/capitals/acc": acc - 0.1})
        run.close()
        ev = {"step": 50, "time": 0.0, "event": "task_eval", "model": str(p)}
        evals = [
            {**ev, "task": "capitals", "metrics": {"acc": acc - 0.3}},  # older
            {**ev, "task": "capitals", "metrics": {"acc": acc, "ece": ece}},
            {**ev, "event": "lm_eval", "source": "/x/wiki.txt", "perplexity": 2**bpb,
             "bits_per_byte": bpb},
        ]
        if name == "b":
            evals.append({**ev, "task": "bias", "metrics": {"gap/male-female": 1.2}})
        append_evals(p, evals)
        paths.append(p)
    rows = {k: (v, d) for k, v, d in eval_rows([load_run(p) for p in paths])}
    assert rows["capitals acc"] == ([0.40, 0.55], 1)  # the newest plinth eval wins
    assert rows["capitals ece"] == ([0.20, 0.10], -1)
    assert rows["wiki.txt bits_per_byte"] == ([1.5, 1.7], -1)
    assert rows["bias gap/male-female"] == ([None, 1.2], 0)
    assert "val/loss" in rows
    out = tmp_path / "cmp.html"
    assert main(["compare", str(paths[0]), str(paths[1]), "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"capitals acc\s+│\s+0\.4\s+│\s+0\.55 \+0\.15 \(\+37\.5%\)", text), text
    html = out.read_text()
    assert "<h2>Evaluations" in html
    assert re.search(r'capitals ece</td>.*?0\.1 <small class="better">', html, re.S)
    assert re.search(r'wiki.txt bits_per_byte</td>.*?1\.7 <small class="worse">', html, re.S)


# ------------------------------------------------------------------- issue 16


@pytest.mark.parametrize(
    ("name", "direction"),
    [
        ("val/loss", -1), ("val/ppl", -1), ("val/bpb", -1), ("train/loss", -1),
        ("val_loss", -1), ("best_val_loss", -1), ("train_loss_tail", -1),
        ("wiki.txt perplexity", -1), ("wiki.txt bits_per_byte", -1), ("x nll", -1),
        ("capitals ece", -1), ("capitals ece@typos", -1), ("rtp mean_toxicity", -1),
        ("peak_mem_mb", -1), ("capitals acc", 1), ("capitals acc@typos", 1),
        ("val/accuracy", 1), ("val/f1", 1), ("tokens_per_s", 1), ("mfu", 1),
        ("bias gap/male-female", 0), ("step", 0), ("tokens", 0), ("wall_s", 0),
        ("compute_h", 0),
    ],
)
def test_metric_direction_has_one_home(name, direction):
    from plinth.report.rundata import eval_direction, metric_direction

    assert metric_direction(name) == direction
    assert eval_direction(name) == direction


def test_lower_perplexity_and_bpb_are_coloured_better(tmp_path, capsys):
    """val/ppl, val/bpb and val/loss: the run with the smaller value is the better one, in the
    page and in the terminal."""
    paths = []
    for name, loss in (("hi", 3.0), ("lo", 2.0)):
        run = RunDir(tmp_path / name, heartbeat=False)
        run.log_event(0, "start", total_steps=10)
        for step in (5, 10):
            run.log_metrics(step, **{"train/loss": loss, "val/loss": loss,
                                     "val/ppl": 2.718**loss, "val/bpb": loss / 2})
        run.log_event(10, "end")
        run.close()
        paths.append(run.path)
    rows = {k: d for k, _, d in __import__("plinth.report.compare", fromlist=["x"]).eval_rows(
        [load_run(p) for p in paths])}
    assert rows["val/ppl"] == rows["val/bpb"] == rows["val/loss"] == -1
    out = tmp_path / "cmp.html"
    assert main(["compare", str(paths[0]), str(paths[1]), "--output", str(out)]) == 0
    html = out.read_text()
    for key in ("val/ppl", "val/bpb", "val/loss"):
        cell = re.search(rf"{re.escape(key)}</td>.*?<small class=\"(\w+)\">", html, re.S)
        assert cell and cell.group(1) == "better", key
        assert re.search(rf"{re.escape(key)}</td>", html)
    assert 'class="worse"' not in html.split("<h2>Evaluations")[1].split("<h2>")[0]


def test_terminal_tables_of_many_runs_fit_the_width(tmp_path):
    """Twelve runs with long names: the terminal summary splits the runs into groups of
    columns that fit, every name shown in full, no line wider than the terminal."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "src"
    paths = []
    for i in range(12):
        run = RunDir(tmp_path / f"sweep-learning-rate-{i:02d}-warmup-cosine", heartbeat=False)
        run.log_event(0, "start", total_steps=10)
        run.log_metrics(10, **{"train/loss": 3.0 - i / 10, "val/loss": 3.1 - i / 10})
        run.log_event(10, "end")
        run.close()
        (run.path / "config.yaml").write_text(f"optim:\n  lr: {0.001 * (i + 1)}\n")
        paths.append(str(run.path))
    env = {**os.environ, "PYTHONPATH": str(src), "COLUMNS": "100"}
    proc = subprocess.run(
        [sys.executable, "-m", "plinth", "compare", *paths, "--output", str(tmp_path / "c.html")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    assert max(len(line) for line in lines) <= 200
    headers = [line for line in lines if "┃" in line]
    for p in paths:  # each run's column header shows its name whole, not cut with an ellipsis
        assert any(Path(p).name in line for line in headers), (Path(p).name, proc.stdout)
    assert "(runs 2-" in proc.stdout  # split into groups, each led by the baseline
    runs_out = subprocess.run(
        [sys.executable, "-m", "plinth", "runs", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert runs_out.returncode == 0 and "Traceback" not in runs_out.stderr
    assert max(len(line) for line in runs_out.stdout.splitlines()) <= 200
    for p in paths:
        assert Path(p).name in runs_out.stdout.replace("\n", "").replace("│", "").replace(" ", "")
