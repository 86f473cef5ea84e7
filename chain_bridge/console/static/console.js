// carechain console: live figures over server-sent events and hand-drawn SVG line charts. No dependencies.
// The page renders every figure on load; this script only keeps them current (GET /events?page=NAME).
"use strict";
(function () {
  const WIDTH = 600, HEIGHT = 120, PAD = 4, MIN_SCALE = 1;  // as chain_bridge/console/charts.py draws them

  function polyline(values) {
    const present = [];
    values.forEach(function (v, i) { if (v !== null && v !== undefined) present.push([i, v]); });
    if (!present.length) return "";
    const top = Math.max.apply(null, [MIN_SCALE].concat(present.map(function (p) { return p[1]; })));
    const step = (WIDTH - 2 * PAD) / Math.max(values.length - 1, 1);
    return present.map(function (p) {
      return (PAD + p[0] * step).toFixed(1) + "," + (HEIGHT - PAD - (p[1] / top) * (HEIGHT - 2 * PAD)).toFixed(1);
    }).join(" ");
  }

  function apply(data) {
    Object.keys(data.figures || {}).forEach(function (key) {
      document.querySelectorAll('[data-live="' + CSS.escape(key) + '"]').forEach(function (el) {
        if (el.textContent !== data.figures[key]) el.textContent = data.figures[key];
      });
    });
    Object.keys(data.series || {}).forEach(function (name) {
      const values = data.series[name];
      document.querySelectorAll('svg[data-chart="' + CSS.escape(name) + '"] polyline').forEach(function (line) {
        line.setAttribute("points", polyline(values));
      });
      const present = values.filter(function (v) { return v !== null && v !== undefined; });
      document.querySelectorAll('[data-peak="' + CSS.escape(name) + '"]').forEach(function (el) {
        const unit = el.dataset.unit || "";
        el.textContent = present.length ? "peak " + Math.max.apply(null, present).toFixed(1) + " " + unit
                                        : "no samples yet";
      });
    });
    document.body.dataset.updated = String(Date.now());
  }

  function start() {
    const block = document.getElementById("live-data");
    if (!block || !window.EventSource) return;
    const page = block.dataset.page;
    const source = new EventSource("/events?page=" + encodeURIComponent(page));
    source.onmessage = function (event) {
      try { apply(JSON.parse(event.data)); } catch (err) { console.warn("console: bad live update", err); }
    };
    // A session that ended (or a restart) closes the stream; EventSource retries by itself, and a page reload
    // then lands on the sign-in page.
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
