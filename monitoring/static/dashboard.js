// The live dashboard page: receives JSON sections over a WebSocket (monitoring/dashboard_server.py)
// and draws them with plotly.js. Every chart is a Plotly figure; this file only maps data to traces.
"use strict";

const CONFIG = { displayModeBar: false, responsive: true };
const IMAGE_PANELS = ["slice_xy", "slice_xz", "slice_yz", "projection_z", "projection_y", "projection_x"];
const GREY = [[0, "#000"], [1, "#fff"]];
const page = { throughput: [], history: [], map: null, isoUserThreshold: null, server: "connecting" };

function $(id) { return document.getElementById(id); }

// Redraws are coalesced per chart: at most one per `minMs` (the latest data wins), none while the
// tab is hidden (drawn when it is shown again). Text and tables update at once; charts cost CPU.
const charts = new Map();  // name -> {draw, timer, last, key}
function schedule(name, minMs, draw, key) {
  const chart = charts.get(name) || { draw: null, timer: null, last: -Infinity, key: undefined };
  charts.set(name, chart);
  if (key !== undefined && key === chart.key && chart.draw === null) return;  // nothing new to draw
  chart.draw = draw;
  chart.pendingKey = key;
  if (chart.timer !== null) return;
  chart.timer = setTimeout(() => run(name), Math.max(0, chart.last + minMs - performance.now()));
}
function run(name) {
  const chart = charts.get(name);
  chart.timer = null;
  if (document.hidden || chart.draw === null) return;  // drawn on visibilitychange
  const draw = chart.draw;
  chart.draw = null;
  chart.key = chart.pendingKey;
  chart.last = performance.now();
  draw();
}
document.addEventListener("visibilitychange", () => {
  if (!document.hidden) for (const name of charts.keys()) run(name);
});
function fmt(value, digits = 0) {
  return value === null || value === undefined || Number.isNaN(value) ? "–" : Number(value).toFixed(digits);
}
function filled(panel) { $(panel).dataset.filled = "true"; }
function baseLayout(extra) {
  return Object.assign({ margin: { l: 50, r: 14, t: 10, b: 40 }, font: { size: 11 }, uirevision: "keep",
                         paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "#fff", showlegend: false }, extra);
}
function setText(id, text) { $(id).textContent = text; }
function setTable(id, rows) {
  const table = $(id);
  table.replaceChildren(...rows.map(([key, value]) => {
    const tr = document.createElement("tr");
    for (const text of [key, value]) {
      const td = document.createElement("td");
      td.textContent = text === null || text === undefined ? "–" : String(text);
      tr.appendChild(td);
    }
    return tr;
  }));
}

// ---------------------------------------------------------------- map: slices, projections, isosurface
function drawMap(map) {
  page.map = map;
  for (const name of IMAGE_PANELS) {
    Plotly.react(name, [{ type: "heatmap", z: map.views[name], colorscale: GREY, showscale: false,
                          hoverinfo: "skip", zmin: 0, zmax: 1 }],
                 baseLayout({ margin: { l: 2, r: 2, t: 2, b: 2 },
                              xaxis: { visible: false, constrain: "domain" },
                              yaxis: { visible: false, scaleanchor: "x", constrain: "domain" } }), CONFIG);
  }
  setText("map-note", `${map.particles} particles · box ${map.box} px · ${fmt(map.apix, 2)} Å/px`);
  filled("panel-map");
  schedule("isosurface", 10000, () => drawIsosurface(map));  // the costliest chart: at most every 10 s
  drawFsc(map);
}

function drawIsosurface(map) {
  const iso = map.isosurface;
  const slider = $("iso-threshold");
  slider.min = iso.threshold_min; slider.max = iso.threshold_max;
  const threshold = page.isoUserThreshold ?? iso.threshold;
  slider.value = threshold;
  setText("iso-threshold-value", fmt(threshold, 2));
  if (!webglAvailable()) {
    setText("isosurface", "This browser has no WebGL: the 3D view is off (the slices above show the map).");
    return;
  }
  const { x, y, z } = isoGrid(iso.n, iso.spacing_angstrom);
  Plotly.react("isosurface", [{
    type: "isosurface", x, y, z, value: iso.values,
    isomin: threshold, isomax: iso.threshold_max + 1, surface: { count: 1 }, showscale: false,
    caps: { x: { show: false }, y: { show: false }, z: { show: false } },
    colorscale: [[0, "#e9c46a"], [1, "#e9c46a"]], lighting: { ambient: 0.5, diffuse: 0.8, specular: 0.3 },
    hoverinfo: "skip" }],
  baseLayout({ margin: { l: 0, r: 0, t: 0, b: 0 },
               scene: { aspectmode: "cube", xaxis: { title: { text: "x (Å)" } }, yaxis: { title: { text: "y (Å)" } },
                        zaxis: { title: { text: "z (Å)" } } } }), CONFIG);
  filled("panel-iso");
}

// voxel centres (Å, x fastest) of the isosurface grid: the same for every map of a session, so made once
function isoGrid(n, spacing) {
  const key = `${n}/${spacing}`;
  if (page.isoGrid?.key !== key) {
    const x = [], y = [], z = [];
    for (let k = 0; k < n; k++) for (let j = 0; j < n; j++) for (let l = 0; l < n; l++) {
      x.push((l - n / 2) * spacing); y.push((j - n / 2) * spacing); z.push((k - n / 2) * spacing);
    }
    page.isoGrid = { key, x, y, z };
  }
  return page.isoGrid;
}

let webgl = null;
function webglAvailable() {
  if (webgl === null) {
    try { webgl = !!document.createElement("canvas").getContext("webgl"); } catch (e) { webgl = false; }
  }
  return webgl;
}

function onThreshold() {
  const value = Number($("iso-threshold").value);
  page.isoUserThreshold = value;
  setText("iso-threshold-value", fmt(value, 2));
  if (page.map && webglAvailable()) Plotly.restyle("isosurface", { isomin: [value] });
}

// ---------------------------------------------------------------- FSC and resolution history
function drawFsc(map) {
  const f = map.fsc.frequency_per_angstrom, nyquist = f[f.length - 1];
  const ticks = [50, 30, 20, 15, 10, 8, 6, 5, 4, 3, 2.5, 2].filter((a) => 1 / a <= nyquist * 1.0001);
  Plotly.react("fsc", [
    { x: f, y: map.fsc.fsc, mode: "lines+markers", marker: { size: 4 }, line: { color: "#1f77b4" },
      hovertemplate: "%{customdata:.1f} Å: FSC %{y:.3f}<extra></extra>",
      customdata: f.map((v) => (v > 0 ? 1 / v : null)) },
  ], baseLayout({
    xaxis: { title: { text: "resolution (Å)" }, tickvals: ticks.map((a) => 1 / a), ticktext: ticks.map(String),
             range: [0, nyquist] },
    yaxis: { title: { text: "FSC" }, range: [-0.1, 1.05] },
    shapes: [{ type: "line", xref: "paper", x0: 0, x1: 1, y0: map.fsc_threshold, y1: map.fsc_threshold,
               line: { color: "#b42318", dash: "dash", width: 1 } }],
    annotations: [{ xref: "paper", x: 1, y: map.fsc_threshold, yanchor: "bottom", xanchor: "right",
                    showarrow: false, text: `${map.fsc_threshold} → ${fmt(map.resolution_angstrom, 2)} Å`,
                    font: { color: "#b42318" } }],
  }), CONFIG);
  filled("panel-fsc");
}

function drawResolution(history) {
  page.history = history;
  const rows = history.filter((r) => r[2] !== null);
  if (!rows.length) return;
  const particles = rows.map((r) => r[1]), times = rows.map((r) => new Date(r[0] * 1000)), res = rows.map((r) => r[2]);
  const byTime = page.resolutionByTime === true;
  Plotly.react("resolution", [{ x: byTime ? times : particles, y: res, mode: "lines+markers", marker: { size: 4 },
                                line: { color: "#6941c6" },
                                hovertemplate: "%{y:.2f} Å<extra></extra>" }],
    baseLayout({
      xaxis: { title: { text: byTime ? "time" : "particles in map" }, type: byTime ? "date" : "linear" },
      yaxis: { title: { text: "resolution (Å), FSC 0.143" } },
      updatemenus: [{ type: "buttons", direction: "left", x: 1, xanchor: "right", y: 1.02, yanchor: "bottom",
                      showactive: true, active: byTime ? 1 : 0, pad: { r: 2, t: 0 },
                      buttons: [
                        { label: "vs particles", method: "update",
                          args: [{ x: [particles] }, { "xaxis.title.text": "particles in map", "xaxis.type": "linear" }],
                          execute: true },
                        { label: "vs time", method: "update",
                          args: [{ x: [times] }, { "xaxis.title.text": "time", "xaxis.type": "date" }],
                          execute: true }] }],
      margin: { l: 50, r: 14, t: 26, b: 40 },
    }), CONFIG);
  if (!page.resolutionButtons) {  // once: Plotly keeps the handler across redraws
    $("resolution").on("plotly_buttonclicked", (ev) => { page.resolutionByTime = ev.button.label === "vs time"; });
    page.resolutionButtons = true;
  }
  filled("panel-resolution");
}

// ---------------------------------------------------------------- 2D classes: the gallery
// Tiles come in the server's order (largest class first); each average is a PNG made by the server
// (monitoring/class_tiles.py: at most 64 px, scaled to its own min-max, y up like the map slices).
function drawClasses(classes) {
  if (!classes) return;
  $("class-gallery").replaceChildren(...classes.classes.map(classTile));
  const shown = classes.classes.length < classes.count ? ` (the ${classes.classes.length} largest shown)` : "";
  setText("classes-note", `${classes.count} classes${shown} · ${classes.junk} junk · ` +
          `${classes.particles} particles classified · set ${classes.version} · box ${classes.box} px, ` +
          `${fmt(classes.apix, 2)} Å/px`);
  filled("panel-classes");
}

function classTile(c) {
  const tile = document.createElement("figure");
  tile.className = c.junk ? "class-tile junk" : "class-tile";
  tile.dataset.number = c.number;
  const resolution = c.resolution_angstrom === null ? "– Å" : `${fmt(c.resolution_angstrom, 1)} Å`;
  tile.title = `class ${c.number}: ${fmt(c.count, 1)} particles (${fmt(100 * c.fraction, 1)} %), ` +
    `resolution ${resolution}, in-plane accuracy ${c.accuracy_degrees === null ? "–" : fmt(c.accuracy_degrees, 1)}°, ` +
    `junk score ${fmt(c.junk_score, 2)}${c.junk ? " (junk)" : ""}`;
  const image = document.createElement("img");
  image.src = `data:image/png;base64,${c.png}`;
  image.alt = `average of class ${c.number}`;
  const caption = document.createElement("figcaption");
  const parts = [["class-number", `#${c.number}`], ["class-count", `${fmt(c.count)} ptcls`],
                 ["class-resolution", resolution]];
  if (c.junk) parts.push(["junk-label", "junk"]);
  caption.replaceChildren(...parts.map(([name, text]) => {
    const span = document.createElement("span");
    span.className = name;
    span.textContent = text;
    return span;
  }));
  tile.append(image, caption);
  return tile;
}

// ---------------------------------------------------------------- status: throughput, queues, views, tables
function drawThroughput() {
  const rows = page.throughput;
  if (!rows.length) return;
  const t = rows.map((r) => new Date(r[0] * 1000));
  Plotly.react("throughput", [
    { x: t, y: rows.map((r) => r[2]), name: "particles/s", mode: "lines", line: { color: "#1a7f37" } },
    { x: t, y: rows.map((r) => r[1]), name: "particles in map", mode: "lines", yaxis: "y2",
      line: { color: "#667085", dash: "dot" } },
  ], baseLayout({ showlegend: true, legend: { orientation: "h", y: 1.12, x: 0 },
                  margin: { l: 50, r: 60, t: 24, b: 40 },
                  xaxis: { type: "date" }, yaxis: { title: { text: "particles/s" }, rangemode: "tozero" },
                  yaxis2: { title: { text: "particles in map" }, overlaying: "y", side: "right",
                            rangemode: "tozero", showgrid: false } }), CONFIG);
  filled("panel-throughput");
}

function drawQueues(status) {
  const q = Object.assign({}, status.queues || {});
  q["files not yet complete"] = status.files_pending;
  const names = Object.keys(q);
  schedule("queues", 2000, () => Plotly.react("queues", [{
    type: "bar", orientation: "h", y: names, x: names.map((k) => q[k]), marker: { color: "#2e90fa" },
    hovertemplate: "%{y}: %{x}<extra></extra>" }],
  baseLayout({ margin: { l: 140, r: 14, t: 4, b: 30 }, xaxis: { title: { text: "items waiting" }, rangemode: "tozero",
                                                              dtick: 1 } }), CONFIG), JSON.stringify(q));
  setTable("totals", [
    ["particles ingested", status.particles_ingested], ["particles posed", status.particles_posed],
    ["particles in map", status.particles_in_map], ["particles refined", status.particles_refined],
    ["particles re-posed", status.particles_reposed], ["particles rejected", status.particles_rejected],
    ["files seen", status.files_seen], ["files rejected", status.files_rejected],
  ]);
  filled("panel-queues");
}

function drawViews(views) {
  if (!views) return;
  const counts = views.counts, cells = counts.length * counts[0].length;
  const total = counts.reduce((s, row) => s + row.reduce((a, b) => a + b, 0), 0);
  if (!total) return;
  const mean = total / cells;
  const density = counts.map((row) => row.map((c) => c / mean));
  const empty = counts.flat().filter((c) => c === 0).length;
  const peak = Math.max(...density.flat());
  schedule("views", 5000, () => Plotly.react("views", [{ type: "heatmap", x: views.azimuth_edges_degrees, y: views.elevation_edges_degrees,
                           z: density, colorscale: "Viridis", zmin: 0,
                           colorbar: { title: { text: "× uniform" }, thickness: 12 },
                           hovertemplate: "azimuth %{x:.0f}°, elevation %{y:.0f}°: %{z:.2f}× uniform<extra></extra>" }],
    baseLayout({ xaxis: { title: { text: "azimuth (°)" }, range: [-180, 180], dtick: 60 },
                 yaxis: { title: { text: "elevation (°)" }, range: [-90, 90], dtick: 30 },
                 margin: { l: 50, r: 10, t: 26, b: 40 },
                 annotations: [{ xref: "paper", yref: "paper", x: 0, y: 1.0, yanchor: "bottom", xanchor: "left",
                                 showarrow: false,
                                 text: `${total} particles · densest ${fmt(peak, 1)}× uniform · ` +
                                       `${fmt(100 * empty / cells, 0)}% cells empty` }] }),
    CONFIG), JSON.stringify(counts));
  filled("panel-views");
}

function drawRejected(status) {
  const body = $("rejected").tBodies[0];
  const rows = (status.rejected_recent || []).slice().reverse();
  body.replaceChildren(...rows.map((r) => {
    const tr = document.createElement("tr");
    for (const text of [new Date(r.time * 1000).toLocaleTimeString(), r.path, r.reason]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.appendChild(td);
    }
    return tr;
  }));
  if (!rows.length) {
    const tr = document.createElement("tr"), td = document.createElement("td");
    td.colSpan = 3; td.textContent = "none: every file so far was taken"; tr.appendChild(td); body.appendChild(tr);
  }
  setText("rejected-count", `${status.files_rejected ?? 0} file(s), ${status.particles_rejected ?? 0} particle(s)` +
          " · all in rejected.tsv");
  filled("panel-rejected");
}

function drawSession(status, connection) {
  const r = status.refinement || {};
  setTable("session", [
    ["watched directory", status.watch], ["box", status.box === null ? null : `${status.box} px`],
    ["pixel size", status.apix === null ? null : `${fmt(status.apix, 3)} Å`],
    ["model", status.model ?? "none (map-only)"], ["model box", status.model_box],
    ["device", status.device], ["poses from", status.poses_from],
    ["refinement", r.active ? `${r.phase} (map v${r.reference_version})` : (r.phase || "off")],
    ["uptime", status.uptime_seconds === undefined ? null : `${fmt(status.uptime_seconds / 60, 1)} min`],
    ["stream", connection ? connection.endpoint : null], ["session id", connection ? connection.session : null],
    ["daemon restarts seen", connection ? connection.restarts : null],
  ]);
  filled("panel-session");
}

function drawStatus(status) {
  page.status = status;
  setText("head-particles", fmt(status.particles_in_map));
  setText("head-rate", fmt(status.particles_per_second, 1));
  setText("head-resolution", status.resolution_angstrom === null ? "–" : `${fmt(status.resolution_angstrom, 2)} Å`);
  const r = status.refinement || {};
  setText("head-phase", r.active ? r.phase : (r.phase || "off"));
  drawQueues(status);
  drawViews(status.views);
  drawRejected(status);
  drawSession(status, page.connection);
}

// ---------------------------------------------------------------- connection state
function drawConnection(connection) {
  if (connection) page.connection = connection;
  const badge = $("connection"), banner = $("stale-banner");
  let state = page.server === "open" ? (page.connection ? page.connection.state : "waiting") : "offline";
  const labels = { live: "live", stale: "stale", waiting: "waiting for the daemon", offline: "dashboard offline" };
  badge.className = `badge ${state}`;
  badge.textContent = labels[state];
  if (state === "stale") {
    banner.hidden = false;
    banner.textContent = `No data from the daemon for ${fmt(page.connection.seconds_since_message, 0)} s ` +
      `(${page.connection.endpoint}): it may have stopped. Showing the last data received; ` +
      "the page updates again as soon as it is back.";
  } else if (state === "offline") {
    banner.hidden = false;
    banner.textContent = "Lost the connection to the dashboard server; reconnecting… (the data shown are the last received)";
  } else {
    banner.hidden = true;
  }
  if (page.status) drawSession(page.status, page.connection);
}

// ---------------------------------------------------------------- messages
function apply(sections) {
  if (sections.map) drawMap(sections.map);
  if (sections.resolution_history) drawResolution(sections.resolution_history);
  if (sections.throughput) { page.throughput = sections.throughput; schedule("throughput", 2000, drawThroughput); }
  if (sections.throughput_point) {
    page.throughput.push(sections.throughput_point);
    if (page.throughput.length > 7200) page.throughput.shift();
    schedule("throughput", 2000, drawThroughput);
  }
  if (sections.status) drawStatus(sections.status);
  if (sections.classes) drawClasses(sections.classes);
  if (sections.connection) drawConnection(sections.connection);
}

function connect() {
  const socket = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
  socket.onopen = () => { page.server = "open"; drawConnection(); };
  socket.onmessage = (event) => {
    const message = JSON.parse(event.data);
    apply(message.snapshot ? message.snapshot : message);
  };
  socket.onclose = () => { page.server = "closed"; drawConnection(); setTimeout(connect, 1000); };
}

$("iso-threshold").addEventListener("input", onThreshold);
connect();
