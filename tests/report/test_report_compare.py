"""`plinth compare`: config/version diff, final metrics with deltas, divergence beyond noise."""

from __future__ import annotations

import json
import re

import pytest

from plinth.cli import main
from plinth.report.compare import comparison, config_diff, divergence, render_compare
from plinth.report.rundata import load_run
from plinth.report.synthetic import write_synthetic_run
from plinth.track.run import RunDir


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
        run = RunDir(p)  # appends
        run.log_metrics(50, **{"eval/capitals/acc": acc - 0.1})
        run.log_event(50, "task_eval", task="capitals", metrics={"acc": acc - 0.3})  # older
        run.log_event(50, "task_eval", task="capitals", metrics={"acc": acc, "ece": ece})
        run.log_event(50, "lm_eval", source="/x/wiki.txt", perplexity=2**bpb, bits_per_byte=bpb)
        if name == "b":
            run.log_event(50, "task_eval", task="bias", metrics={"gap/male-female": 1.2})
        run.close()
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
