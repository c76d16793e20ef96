"""The report and comparison pages in a real headless Chromium: they load offline with no
console errors, every chart draws its data, the controls work, and screenshots are saved to
test-artifacts/ (report.png, report-tokens-logy.png, compare.png).

Needs Playwright for Python and the distribution's Chromium (`apt-get install -y chromium`;
never `playwright install`); skips with the reason when either is missing. Set
PLINTH_CHROMIUM to use another Chromium binary.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from plinth.report.compare import comparison, render_compare
from plinth.report.report import render_report
from plinth.report.rundata import load_run
from plinth.report.synthetic import write_synthetic_run

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium_path() -> str | None:
    for cand in (
        os.environ.get("PLINTH_CHROMIUM"),
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
        "/usr/bin/chromium",
    ):
        if cand and Path(cand).is_file():
            return cand
    return None


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright not installed (pip install playwright)"
    )
    exe = chromium_path()
    if exe is None:
        pytest.skip("no Chromium binary (apt-get install -y chromium, or set PLINTH_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    faulty = write_synthetic_run(
        root / "faulty",
        steps=1500,
        nan_steps=[250],
        spike_steps=[320, 900],
        stall=(1100, 1120),
        rollback=(700, 600),
    )
    other = write_synthetic_run(
        root / "other",
        steps=1200,
        seed=7,
        offset=(500, 0.5),
        crash_at=1100,
        torn_line=True,
        overrides=("optim.lr=0.005", "tracking.log_every=1"),
    )
    runs = [load_run(faulty), load_run(other)]
    report = root / "report.html"
    report.write_text(render_report(runs[0], max_points=800), encoding="utf-8")
    cmp = root / "compare.html"
    cmp.write_text(render_compare(runs, comparison(runs)), encoding="utf-8")
    return report, cmp


def open_page(browser, path: Path):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    problems, requests = [], []
    page.on(
        "console",
        lambda m: (
            problems.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None
        ),
    )
    page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(path.as_uri())
    page.wait_for_function("window.__plinth && window.__plinth.ready", timeout=15_000)
    return page, problems, requests


DRAWN = """() => Array.from(document.querySelectorAll('.chart')).map(el => {
  const c = el.querySelector('canvas');
  if (!c) return {id: el.id, drawn: 0};
  const ctx = c.getContext('2d');
  const px = ctx.getImageData(0, 0, c.width, c.height).data;
  let drawn = 0;
  for (let i = 3; i < px.length; i += 4 * 7) if (px[i] > 0) drawn++;
  return {id: el.id, drawn, width: c.width};
})"""


def check_charts(page, expected: set[str]) -> list[dict]:
    state = page.evaluate("window.__plinth")
    charts = {c["id"]: c for c in state["charts"]}
    assert expected <= set(charts), set(charts)
    for cid in expected:
        assert charts[cid]["series"] >= 1 and charts[cid]["points"] > 0, charts[cid]
    drawn = page.evaluate(DRAWN)
    assert len(drawn) == len(state["charts"])
    for d in drawn:
        assert d["drawn"] > 200, d  # non-blank: lines, axes and grid were painted
    return drawn


def test_report_page_in_chromium(browser, pages):
    report, _ = pages
    page, problems, requests = open_page(browser, report)
    check_charts(page, {"loss", "lr", "grad", "throughput", "steptime", "memory", "resources"})
    assert all(u.startswith(("file:", "data:", "about:")) for u in requests), requests
    loss = page.evaluate("window.__plinth.charts.find(c => c.id === 'loss')")
    assert loss["series"] == 3  # raw + smoothed train loss, val loss
    assert page.locator("#events tbody tr").count() > 10
    assert page.locator("#chart-loss .u-legend").count() == 1
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)

    # controls: x axis, log y, smoothing, marker toggle, event filter, config filter
    page.check("input[name=xaxis][value=tokens]")
    page.check("#chart-loss .logy")
    page.check("#chart-grad .logy")
    page.fill("#smoothing", "0.9")
    page.dispatch_event("#smoothing", "input")
    page.uncheck("#show-markers")
    page.select_option("#event-filter", "anomaly")
    visible = page.locator("#events tbody tr:visible")
    assert visible.count() >= 4
    assert all(k == "anomaly" for k in visible.evaluate_all("rs => rs.map(r => r.dataset.kind)"))
    drawn = page.evaluate(DRAWN)
    assert all(d["drawn"] > 200 for d in drawn), drawn
    loss = page.evaluate("window.__plinth.charts.find(c => c.id === 'loss')")
    assert loss["logy"] and loss["xmax"] >= 1500 * 4096 * 0.99  # x is now tokens seen
    page.screenshot(path=str(ARTIFACTS / "report-tokens-logy.png"), full_page=False)
    page.check("input[name=xaxis][value=time]")
    assert all(d["drawn"] > 200 for d in page.evaluate(DRAWN))
    loss = page.evaluate("window.__plinth.charts.find(c => c.id === 'loss')")
    assert 600 < loss["xmax"] < 1000  # seconds of run time (1600 steps x 0.5 s)
    assert problems == [], problems
    page.close()


def test_compare_page_in_chromium(browser, pages):
    _, cmp = pages
    page, problems, requests = open_page(browser, cmp)
    check_charts(page, {"train-loss", "val-loss", "lr", "grad_norm", "tokens_per_s", "loss-gap"})
    train = page.evaluate("window.__plinth.charts.find(c => c.id === 'train-loss')")
    assert train["series"] == 4  # raw + smoothed for each of the two runs
    assert all(u.startswith(("file:", "data:", "about:")) for u in requests), requests
    assert page.get_by_text("loss diverges at step").count() >= 1
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "compare.png"), full_page=True)
    page.check("input[name=xaxis][value=time]")
    assert all(d["drawn"] > 200 for d in page.evaluate(DRAWN))
    assert problems == [], problems
    page.close()


# ------------------------------------------------------------------- issue 16: layout, markers

NO_OVERFLOW = """() => {
  document.querySelectorAll('details').forEach((d) => { d.open = true; });
  const vw = document.documentElement.clientWidth;
  return {vw, page: document.documentElement.scrollWidth, body: document.body.scrollWidth,
          boxes: Array.from(document.querySelectorAll('.tbl'))
                      .filter((t) => t.scrollWidth > t.clientWidth + 1).length};
}"""


@pytest.fixture(scope="module")
def wide_pages(tmp_path_factory):
    """A comparison of 14 runs with long names, config differences and evaluations, and the
    report of one of them: tables far wider than any screen."""
    from plinth.track.run import append_evals

    root = tmp_path_factory.mktemp("wide")
    runs = []
    for i in range(14):
        path = root / f"a-rather-long-experiment-name-{i:02d}-lr-sweep-with-warmup-and-cosine"
        write_synthetic_run(
            path, steps=40, seed=i, eval_every=20, checkpoint_every=20, system=False,
            overrides=(f"optim.lr={0.001 * (i + 1)}", f"optim.warmup_steps={i + 1}",
                       f"tracking.run_name=run-{'x' * 90}-{i}", "tracking.log_every=1"),
        )
        append_evals(path, [
            {"step": 40, "time": 0.0, "event": "task_eval", "model": str(path),
             "task": f"a_task_with_a_long_name_{j}", "n": 3, "shots": 0,
             "metrics": {f"a_long_metric_name_{k}": 0.5 + i / 100 for k in range(3)}}
            for j in range(5)
        ])
        runs.append(load_run(path))
    report = root / "report.html"
    report.write_text(render_report(runs[0]), encoding="utf-8")
    cmp = root / "compare.html"
    cmp.write_text(render_compare(runs, comparison(runs)), encoding="utf-8")
    return report, cmp


@pytest.mark.parametrize("width", [1400, 600])
def test_wide_tables_scroll_inside_their_box_not_the_page(browser, wide_pages, width):
    for path in wide_pages:
        page = browser.new_page(viewport={"width": width, "height": 900})
        page.goto(path.as_uri())
        page.wait_for_function("window.__plinth && window.__plinth.ready", timeout=15_000)
        got = page.evaluate(NO_OVERFLOW)
        assert got["page"] <= got["vw"] and got["body"] <= got["vw"], (path.name, got)
        if path.name == "compare.html":
            assert got["boxes"] >= 1, got  # the wide tables are there, scrolling sideways
        page.close()


def _single_point_run(path: Path, step: int, loss: float) -> Path:
    from plinth.track.run import RunDir

    run = RunDir(path, heartbeat=False)
    run.log_event(0, "start", total_steps=step)
    run.log_metrics(step, tokens=step * 4096, **{"train/loss": loss, "val/loss": loss + 0.1})
    run.close()
    return path


ORANGE_PIXELS = """(sel) => {
  const c = document.querySelector(sel + ' canvas');
  const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 0; i < px.length; i += 4)
    if (Math.abs(px[i] - 255) < 12 && Math.abs(px[i + 1] - 127) < 12 &&
        Math.abs(px[i + 2] - 14) < 12 && px[i + 3] > 200) n++;
  return n;
}"""


def test_a_run_with_one_logged_point_shows_as_a_marker(browser, tmp_path):
    many = load_run(write_synthetic_run(tmp_path / "many", steps=300, system=False))
    one = load_run(_single_point_run(tmp_path / "one", 150, 2.0))
    lone = load_run(_single_point_run(tmp_path / "lone", 20, 4.0))
    for runs, name in (([many, one], "mixed.html"), ([lone, one], "single.html")):
        out = tmp_path / name
        out.write_text(render_compare(runs, comparison(runs)), encoding="utf-8")
        page, problems, _ = open_page(browser, out)
        charts = {c["id"]: c for c in page.evaluate("window.__plinth.charts")}
        assert charts["train-loss"]["points"] >= 2 and charts["val-loss"]["points"] >= 2
        for chart in ("#chart-train-loss", "#chart-val-loss"):
            # the second run's colour (#ff7f0e) is on the canvas: its single point is drawn
            assert page.evaluate(ORANGE_PIXELS, chart) > 20, (name, chart)
        assert problems == [], problems
        page.close()
