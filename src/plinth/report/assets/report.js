// plinth report charts: reads the JSON payload in #plinth-data and draws it with uPlot.
// Controls: x axis (step / tokens / run time), smoothing (EMA), log-y per chart, markers.
(function () {
  "use strict";
  const DATA = JSON.parse(document.getElementById("plinth-data").textContent);
  const state = { axis: DATA.axes[0], smoothing: DATA.smoothing || 0, markers: true };
  const charts = [];  // {spec, u, el, logy}
  let syncing = false;

  const AXIS_LABEL = { step: "step", tokens: "tokens", time: "run time" };

  function si(v) {
    const a = Math.abs(v);
    if (a >= 1e12) return +(v / 1e12).toPrecision(3) + "T";
    if (a >= 1e9) return +(v / 1e9).toPrecision(3) + "B";
    if (a >= 1e6) return +(v / 1e6).toPrecision(3) + "M";
    if (a >= 1e4) return +(v / 1e3).toPrecision(3) + "k";
    return String(+v.toPrecision(4));
  }
  function duration(s) {
    if (s == null) return "";
    if (s < 120) return s.toFixed(s < 10 ? 1 : 0) + "s";
    if (s < 7200) return (s / 60).toFixed(1) + "m";
    return (s / 3600).toFixed(2) + "h";
  }
  function fmtX(v) {
    if (v == null) return "";
    return state.axis === "time" ? duration(v) : si(v);
  }
  function fmtY(v) {
    if (v == null) return "-";
    const a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(3);
    return String(+v.toPrecision(5));
  }

  // EMA with bias correction (as in TensorBoard), skipping gaps.
  function ema(values, weight) {
    if (!weight) return values.slice();
    const out = new Array(values.length).fill(null);
    let last = 0, n = 0;
    for (let i = 0; i < values.length; i++) {
      const v = values[i];
      if (v == null) continue;
      last = last * weight + (1 - weight) * v;
      n++;
      out[i] = last / (1 - Math.pow(weight, n));
    }
    return out;
  }

  function buildData(spec, logy) {
    const axis = state.axis;
    const present = spec.series.filter((s) => s.x[axis]);
    const xsSet = new Set();
    for (const s of present) for (const x of s.x[axis]) if (x != null) xsSet.add(x);
    const xs = Array.from(xsSet).sort((a, b) => a - b);
    const pos = new Map(xs.map((x, i) => [x, i]));
    const data = [xs];
    const series = [{ label: AXIS_LABEL[axis], value: (u, v) => fmtX(v) }];
    let points = 0;
    for (const s of spec.series) {
      const col = new Array(xs.length).fill(null);
      const sx = s.x[axis];
      let own = 0;
      if (sx) {
        for (let i = 0; i < sx.length; i++) {
          const y = s.y[i];
          if (sx[i] == null || y == null || (logy && y <= 0)) continue;
          col[pos.get(sx[i])] = y;
          own++;
        }
      }
      points += own;
      // a line needs two points: a series with one logged point is drawn as a marker
      const single = own === 1;
      const base = {
        label: s.label, stroke: s.color, width: s.width || 1.5, scale: s.scale || "y",
        spanGaps: true, value: (u, v) => fmtY(v), dash: s.dash ? [6, 4] : undefined,
        points: { show: !!s.points || single, size: single ? 9 : 5, fill: s.color },
      };
      if (s.smooth) {
        data.push(col);
        series.push(Object.assign({}, base, {
          label: s.label + " (raw)", stroke: s.faint || s.color + "55", width: 1,
        }));
        data.push(ema(col, state.smoothing));
        series.push(base);
      } else {
        data.push(col);
        series.push(base);
      }
    }
    return { data, series, points };
  }

  function drawOverlays(u, spec) {
    const ctx = u.ctx, b = u.bbox, axis = state.axis, dpr = devicePixelRatio || 1;
    ctx.save();
    ctx.beginPath();
    ctx.rect(b.left, b.top, b.width, b.height);
    ctx.clip();
    ctx.font = `${10 * dpr}px sans-serif`;
    for (const h of spec.hlines || []) {
      const y = u.valToPos(h.y, h.scale || "y", true);
      if (!isFinite(y)) continue;
      ctx.strokeStyle = h.color || "#c0392b";
      ctx.setLineDash([6 * dpr, 4 * dpr]);
      ctx.lineWidth = dpr;
      ctx.beginPath();
      ctx.moveTo(b.left, y);
      ctx.lineTo(b.left + b.width, y);
      ctx.stroke();
      ctx.fillStyle = h.color || "#c0392b";
      ctx.textAlign = "right";
      ctx.fillText(h.label, b.left + b.width - 4 * dpr, y - 4 * dpr);
      ctx.textAlign = "left";
    }
    if (state.markers) {
      for (const m of DATA.markers) {
        const v = m[axis];
        if (v == null) continue;
        const x = u.valToPos(v, "x", true);
        if (x < b.left || x > b.left + b.width) continue;
        const style = DATA.markerKinds[m.kind] || { color: "#999" };
        ctx.strokeStyle = style.color;
        ctx.lineWidth = (style.width || 1) * dpr;
        ctx.setLineDash(style.dash ? [3 * dpr, 3 * dpr] : []);
        ctx.beginPath();
        ctx.moveTo(x, b.top);
        ctx.lineTo(x, b.top + b.height);
        ctx.stroke();
      }
    }
    ctx.setLineDash([]);
    for (const s of spec.series) {
      const nx = s.nonfinite && s.nonfinite[axis];
      if (!nx) continue;
      ctx.fillStyle = "#d62728";
      for (const v of nx) {
        if (v == null) continue;
        const x = u.valToPos(v, "x", true);
        if (x < b.left - 1 || x > b.left + b.width + 1) continue;
        const t = b.top + 2 * dpr, w = 5 * dpr;
        ctx.beginPath();
        ctx.moveTo(x - w, t);
        ctx.lineTo(x + w, t);
        ctx.lineTo(x, t + 1.6 * w);
        ctx.closePath();
        ctx.fill();
      }
    }
    ctx.restore();
  }

  function cursorInfo(u, entry) {
    const left = u.cursor.left;
    const info = entry.el.querySelector(".chart-info");
    if (left == null || left < 0) { info.textContent = ""; return; }
    const axis = state.axis, near = [];
    if (state.markers) {
      for (const m of DATA.markers) {
        if (m[axis] == null) continue;
        if (Math.abs(u.valToPos(m[axis], "x") - left) <= 4) near.push(m.label);
      }
    }
    for (const s of entry.spec.series) {
      const nx = s.nonfinite && s.nonfinite[axis];
      if (!nx) continue;
      nx.forEach((v, i) => {
        if (v != null && Math.abs(u.valToPos(v, "x") - left) <= 4)
          near.push(`${s.label} = ${s.nonfinite.values[i]} at step ${s.nonfinite.step[i]}`);
      });
    }
    info.textContent = near.slice(0, 4).join(" · ");
  }

  function makeChart(entry) {
    const spec = entry.spec;
    const holder = entry.el.querySelector(".chart-canvas");
    holder.innerHTML = "";
    if (entry.u) entry.u.destroy();
    const built = buildData(spec, entry.logy);
    entry.points = built.points;
    if (!built.points && !(spec.series.some((s) => s.nonfinite && s.nonfinite[state.axis] && s.nonfinite[state.axis].length))) {
      holder.innerHTML = '<div class="empty">no data on this axis yet</div>';
      entry.u = null;
      return;
    }
    const usesY2 = spec.series.some((s) => s.scale === "y2");
    const axes = [
      { values: (u, vals) => vals.map(fmtX), label: AXIS_LABEL[state.axis], labelSize: 18 },
      { values: (u, vals) => vals.map((v) => (v == null ? "" : fmtY(v))), size: 64,
        label: spec.yLabel || "", labelSize: 18 },
    ];
    const scales = { x: { time: false }, y: entry.logy ? { distr: 3 } : {} };
    if (spec.yZero && !entry.logy) scales.y.range = (u, min, max) => [0, max > 0 ? max * 1.05 : 1];
    if (usesY2) {
      axes.push({ scale: "y2", side: 1, grid: { show: false }, size: 64,
                  values: (u, vals) => vals.map((v) => (v == null ? "" : fmtY(v))),
                  label: spec.y2Label || "", labelSize: 18 });
      scales.y2 = spec.y2Zero ? { range: (u, min, max) => [0, max > 0 ? max * 1.05 : 1] } : {};
    }
    const width = Math.max(280, holder.clientWidth || 600);
    const opts = {
      width, height: spec.height || 240, scales, axes, series: built.series,
      legend: { live: true },
      cursor: { sync: { key: "plinth" }, drag: { x: true, y: false } },
      hooks: {
        draw: [(u) => drawOverlays(u, spec)],
        setCursor: [(u) => cursorInfo(u, entry)],
        setScale: [(u, key) => {
          if (key !== "x" || syncing) return;
          syncing = true;
          const { min, max } = u.scales.x;
          for (const other of charts) {
            if (other.u && other.u !== u) other.u.setScale("x", { min, max });
          }
          syncing = false;
        }],
      },
    };
    entry.u = new uPlot(opts, built.data, holder);
  }

  function refreshData() {
    for (const entry of charts) {
      if (!entry.u) { makeChart(entry); continue; }
      const built = buildData(entry.spec, entry.logy);
      entry.u.setData(built.data);
    }
  }

  function init() {
    for (const spec of DATA.charts) {
      const el = document.getElementById("chart-" + spec.id);
      if (!el) continue;
      const entry = { spec, el, u: null, logy: !!spec.logy, points: 0 };
      charts.push(entry);
      const box = el.querySelector(".logy");
      if (box) {
        box.checked = entry.logy;
        box.addEventListener("change", () => { entry.logy = box.checked; makeChart(entry); });
      }
      makeChart(entry);
    }
    const slider = document.getElementById("smoothing");
    if (slider) {
      const out = document.getElementById("smoothing-value");
      slider.value = state.smoothing;
      out.textContent = (+slider.value).toFixed(2);
      slider.addEventListener("input", () => {
        state.smoothing = +slider.value;
        out.textContent = state.smoothing.toFixed(2);
        refreshData();
      });
    }
    for (const r of document.querySelectorAll("input[name=xaxis]")) {
      r.checked = r.value === state.axis;
      r.addEventListener("change", () => { state.axis = r.value; charts.forEach(makeChart); });
    }
    const mk = document.getElementById("show-markers");
    if (mk) mk.addEventListener("change", () => { state.markers = mk.checked; charts.forEach((c) => c.u && c.u.redraw()); });
    const evFilter = document.getElementById("event-filter");
    if (evFilter) evFilter.addEventListener("change", () => {
      for (const row of document.querySelectorAll("#events tbody tr"))
        row.style.display = !evFilter.value || row.dataset.kind === evFilter.value ? "" : "none";
    });
    const nd = document.getElementById("only-nondefault");
    if (nd) nd.addEventListener("change", () => {
      document.getElementById("config").classList.toggle("only-nondefault", nd.checked);
    });
    let resizeTimer = null;
    window.addEventListener("resize", () => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(() => {
        for (const c of charts) {
          if (!c.u) continue;
          const holder = c.el.querySelector(".chart-canvas");
          c.u.setSize({ width: Math.max(280, holder.clientWidth), height: c.u.height });
        }
      }, 150);
    });
    // what the browser test (and a curious reader) can inspect
    window.__plinth = {
      ready: true,
      get axis() { return state.axis; },
      get charts() {
        return charts.map((c) => ({
          id: c.spec.id, series: c.u ? c.u.series.length - 1 : 0, points: c.points,
          logy: c.logy, xmax: c.u ? c.u.scales.x.max : null,
        }));
      },
    };
  }

  init();
})();
