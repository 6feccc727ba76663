// The debug panel at /debug: one KaldrixClient, and what it sees drawn on the page.
//
// Everything shown comes from the client's events ("state", "frame", "*", "gap"), from
// the server's /healthz and /readyz, and, when the token allows REQUEST_METRICS, from the
// server's own metrics. Charts are drawn by hand on canvases; text goes in with
// textContent only, never as HTML.

import { KaldrixClient, PUBLIC_CHANNELS } from "/kaldrix.js";

const LOG_LIMIT = 500;
const CHART_SPAN_MS = 60000;
const MIN_SPAN_MS = 10000;
const PING_INTERVAL_MS = 2000;
const METRICS_INTERVAL_MS = 2000;
const HEALTH_INTERVAL_MS = 5000;
const REDRAW_INTERVAL_MS = 500;
const QUIET_TYPES = new Set(["PING", "PONG", "REQUEST_METRICS", "METRICS_RESPONSE"]);

const $ = (id) => document.getElementById(id);

/** Everything the panel remembers; `window.kaldrixPanel` in the console. */
const panel = {
  client: null,
  channels: new Map(), // name -> {events, offset, epoch}
  busy: new Set(), // channels with a SUBSCRIBE/UNSUBSCRIBE on its way
  gaps: 0,
  reconnections: 0, // WELCOMEs after the first, since the page loaded
  lastDrop: null,
  lastLatency: null,
  rtt: [], // {t, v}
  delivery: [],
  log: [],
  held: [],
  paused: false,
  metricsAllowed: true,
  metrics: { p50: [], p99: [], messages: [], deliveries: [] },
};
window.kaldrixPanel = panel;

// -- connecting ------------------------------------------------------------------------

function tokenFromAddress() {
  const address = new URL(window.location.href);
  const token = address.searchParams.get("token");
  if (token !== null) {
    // Keep the token out of the address bar, the history and screenshots.
    address.searchParams.delete("token");
    history.replaceState(null, "", address.pathname + address.search + address.hash);
  }
  return token;
}

function connect() {
  panel.client?.close();
  const wanted = panel.client ? [...panel.client.state.channels] : [];
  const token = $("token").value.trim() || null;
  const client = new KaldrixClient({
    token,
    channels: wanted,
    pingInterval: PING_INTERVAL_MS,
    pingTimeout: 5000,
    reconnectInterval: 500,
    maxReconnectDelay: 5000,
  });
  panel.client = client;
  panel.metricsAllowed = true;
  client.on("state", (state) => client === panel.client && renderState(state));
  client.on("frame", (frame) => client === panel.client && addLog(frame));
  client.on("*", (event, meta) => client === panel.client && countEvent(event, meta));
  client.on("gap", (gap) => client === panel.client && countGap(gap));
  let welcomed = false;
  client.on("welcome", () => {
    if (welcomed) panel.reconnections += 1;
    welcomed = true;
    client.ping().catch(() => {});
    pollMetrics();
  });
  $("conn-url").textContent = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws${token ? "?token=…" : ""}`;
  client.connect();
  renderChannels();
}

function disconnect() {
  panel.client?.close();
}

// -- connection and health -------------------------------------------------------------

function renderState(state) {
  const pill = $("status");
  pill.dataset.status = state.status;
  pill.textContent = state.status === "reconnecting" ? `reconnecting · attempt ${state.reconnectAttempts}` : state.status;
  $("conn-status").textContent = state.connected ? "connected" : state.status;
  $("conn-server").textContent = state.serverVersion ? `kaldrix ${state.serverVersion}` : "–";
  $("conn-session").textContent = state.sessionId ?? "–";
  $("conn-user").textContent = state.user ? `${state.user.sub} (${state.user.role})` : state.connected ? "anonymous" : "–";
  if (state.status === "reconnecting" && state.error) panel.lastDrop = `${state.error} at ${clock()}`;
  $("conn-attempts").textContent = `${panel.reconnections}${state.reconnectAttempts ? ` · attempt ${state.reconnectAttempts} now` : ""}`;
  $("conn-drop").textContent = panel.lastDrop ?? "–";
  const error = $("conn-error");
  error.hidden = !state.error;
  error.textContent = state.error ? errorText(state) : "";
  if (state.latency !== null && state.latency !== panel.lastLatency) addPoint(panel.rtt, state.latency);
  panel.lastLatency = state.latency;
  $("rtt").textContent = state.latency === null ? "–" : state.latency.toFixed(1);
  renderChannels();
}

function errorText(state) {
  if (/UNAUTHORIZED|authentication failed/.test(state.error)) return `Authentication failed: ${state.error}`;
  return state.error;
}

async function checkHealth() {
  const cell = $("conn-health");
  try {
    const [health, ready] = await Promise.all([fetch("/healthz"), fetch("/readyz")]);
    const body = await health.json();
    const readiness = ready.ok ? "ready" : (await ready.json()).reason ?? `HTTP ${ready.status}`;
    cell.textContent = `${body.status ?? health.status} · ${readiness}`;
    cell.dataset.health = health.ok ? "ok" : "bad";
  } catch {
    cell.textContent = "unreachable";
    cell.dataset.health = "bad";
  }
}

// -- channels --------------------------------------------------------------------------

function channelStats(name) {
  if (!panel.channels.has(name)) panel.channels.set(name, { events: 0, offset: null, epoch: null });
  return panel.channels.get(name);
}

function renderChannels() {
  const joined = new Set(panel.client?.state.channels ?? []);
  const names = [...new Set([...PUBLIC_CHANNELS, ...joined, ...panel.channels.keys()])];
  const body = $("channels");
  body.replaceChildren(
    ...names.map((name) => {
      const stats = panel.channels.get(name);
      const row = document.createElement("tr");
      row.dataset.channel = name;
      row.dataset.joined = String(joined.has(name));
      const button = document.createElement("button");
      button.type = "button";
      button.className = joined.has(name) ? "secondary small" : "small";
      button.textContent = panel.busy.has(name) ? "…" : joined.has(name) ? "Leave" : "Join";
      button.disabled = panel.busy.has(name);
      button.addEventListener("click", () => (joined.has(name) ? leave(name) : join(name)));
      row.append(
        cell(name, "mono"),
        cell(stats ? String(stats.events) : "0", "num"),
        cell(stats?.offset ?? "–", "num"),
        cell(stats?.epoch ?? "–", "mono dim"),
        cell(button, "action"),
      );
      return row;
    }),
  );
}

async function join(name) {
  if (!panel.client || !name) return;
  panel.busy.add(name);
  renderChannels();
  try {
    await panel.client.subscribe(name);
    channelStats(name);
  } catch (error) {
    showError(`cannot join ${name}: ${error.message}`);
  } finally {
    panel.busy.delete(name);
    renderChannels();
  }
}

async function leave(name) {
  if (!panel.client) return;
  panel.busy.add(name);
  renderChannels();
  try {
    await panel.client.unsubscribe(name);
  } catch {
    // Not connected: the channel is left all the same.
  } finally {
    panel.busy.delete(name);
    renderChannels();
  }
}

function countEvent(event, meta) {
  const stats = channelStats(event.channel);
  stats.events += 1;
  stats.offset = event.offset;
  stats.epoch = event.epoch;
  if (meta.latency !== null) {
    addPoint(panel.delivery, meta.latency);
    $("delivery").textContent = meta.latency.toFixed(1);
    const recent = panel.delivery.slice(-50);
    $("delivery-avg").textContent = (recent.reduce((sum, p) => sum + p.v, 0) / recent.length).toFixed(1);
  }
  const row = $("channels").querySelector(`tr[data-channel="${CSS.escape(event.channel)}"]`);
  if (row) {
    row.children[1].textContent = String(stats.events);
    row.children[2].textContent = String(stats.offset);
    row.children[3].textContent = stats.epoch;
  } else {
    renderChannels();
  }
}

function countGap(gap) {
  panel.gaps += 1;
  $("gaps").textContent = String(panel.gaps);
  $("gaps").dataset.gaps = String(panel.gaps);
  const missed = gap.epoch === gap.newEpoch ? `${gap.newOffset - gap.lastOffset} missed` : "history lost";
  addLog({ direction: "gap", message: { type: "GAP", channel: gap.channel, offset: gap.newOffset, payload: { reason: gap.reason, missed } } });
}

function showError(text) {
  const error = $("conn-error");
  error.hidden = false;
  error.textContent = text;
}

// -- event log -------------------------------------------------------------------------

/** Long hex ids and hashes, cut to their ends: 0xb493f4ac…7bb3c3. */
function short(value) {
  const text = String(value);
  return text.length > 20 ? `${text.slice(0, 10)}…${text.slice(-6)}` : text;
}

function clock() {
  return new Date().toISOString().slice(11, 23);
}

function summary(message) {
  const p = message.payload ?? {};
  switch (message.type) {
    case "NEW_BLOCK":
      return `height ${p.height} · ${(p.transactions ?? []).length} tx · ${short(p.blockId)}`;
    case "TX_RECEIVED":
      return `${short(p.from)} → ${short(p.to)} · ${p.amount} · ${p.status}`;
    case "DAG_UPDATE":
      return `${p.updateType} ${short(p.nodeId)}`;
    case "VALIDATOR_EVENT":
      return `${p.eventType} ${p.validatorId}`;
    case "NODE_STATUS":
      return `${p.nodeId} ${p.status}${p.blockHeight !== undefined ? ` · height ${p.blockHeight}` : ""}`;
    case "ALERT_TRIGGERED":
      return `${p.severity}: ${p.message}`;
    case "ERROR":
      return `${p.code}: ${p.message}${p.path ? ` (${p.path})` : ""}`;
    case "ACK":
      return `ref ${p.ref}${p.channels ? " · " + Object.entries(p.channels).map(([c, at]) => `${c}@${at.offset}${at.recovered ? ` recovered +${at.replayed}` : ""}`).join(", ") : ""}`;
    case "WELCOME":
      return `session ${p.sessionId} · ${p.authenticated ? `${p.user?.sub} (${p.user?.role})` : "anonymous"}`;
    case "GAP":
      return `${p.reason} · ${p.missed}`;
    case "SUBSCRIBE":
    case "UNSUBSCRIBE":
      return (p.channels ?? [])
        .map((c) => (p.since?.[c] ? `${c} since ${p.since[c].offset}@${p.since[c].epoch}` : c))
        .join(", ");
    default: {
      const text = JSON.stringify(p);
      return text.length > 140 ? `${text.slice(0, 140)}…` : text;
    }
  }
}

function addLog({ direction, message }) {
  const entry = {
    time: clock(),
    direction,
    type: String(message.type),
    channel: message.channel ?? "",
    offset: message.offset ?? "",
    event: typeof message.channel === "string",
    details: summary(message),
  };
  addFilterOption(entry.type);
  if (panel.paused) {
    panel.held.push(entry);
    if (panel.held.length > LOG_LIMIT) panel.held.shift();
    renderLogCount();
    return;
  }
  panel.log.push(entry);
  if (panel.log.length > LOG_LIMIT) panel.log.shift();
  if (shown(entry)) {
    const body = $("log");
    body.prepend(logRow(entry));
    while (body.childElementCount > LOG_LIMIT) body.lastElementChild.remove();
  }
  renderLogCount();
}

function shown(entry) {
  const filter = $("log-filter").value;
  if (filter === "all") return true;
  if (filter === "default") return !QUIET_TYPES.has(entry.type);
  if (filter === "events") return entry.event;
  return entry.type === filter;
}

function logRow(entry) {
  const row = document.createElement("tr");
  row.className = `dir-${entry.direction}`;
  row.dataset.type = entry.type;
  const arrow = { in: "↓", out: "↑", gap: "!" }[entry.direction] ?? "";
  row.append(
    cell(entry.time, "mono dim"),
    cell(arrow, "dir"),
    cell(entry.type, "type"),
    cell(entry.channel, "mono"),
    cell(String(entry.offset), "num"),
    cell(entry.details, "details"),
  );
  return row;
}

function renderLog() {
  $("log").replaceChildren(...panel.log.filter(shown).reverse().map(logRow));
  renderLogCount();
}

function renderLogCount() {
  const shownCount = $("log").childElementCount;
  const held = panel.paused ? ` · paused, ${panel.held.length} held` : "";
  $("log-count").textContent = `${shownCount} shown of ${panel.log.length}${held}`;
}

function addFilterOption(type) {
  const select = $("log-filter");
  if ([...select.options].some((option) => option.value === type)) return;
  const option = document.createElement("option");
  option.value = type;
  option.textContent = type;
  select.append(option);
}

function togglePause() {
  panel.paused = !panel.paused;
  const button = $("pause");
  button.textContent = panel.paused ? "Resume" : "Pause";
  button.setAttribute("aria-pressed", String(panel.paused));
  if (!panel.paused) {
    panel.log.push(...panel.held.splice(0));
    panel.log.splice(0, Math.max(0, panel.log.length - LOG_LIMIT));
    renderLog();
  }
  renderLogCount();
}

// -- server metrics --------------------------------------------------------------------

async function pollMetrics() {
  const client = panel.client;
  if (!client?.state.connected || !panel.metricsAllowed) return;
  try {
    renderMetrics(await client.requestMetrics("all"));
  } catch (error) {
    if (error.code === "FORBIDDEN" || error.code === "UNAUTHORIZED") {
      panel.metricsAllowed = false;
      $("metrics-body").hidden = true;
      $("metrics-note").hidden = false;
      $("metrics-note").textContent = `REQUEST_METRICS refused (${error.code}): connect with an admin token to see the server's metrics.`;
    }
  }
}

function renderMetrics(metrics) {
  $("metrics-note").hidden = true;
  $("metrics-body").hidden = false;
  const connections = metrics.connections ?? {};
  const throughput = metrics.throughput ?? {};
  const delivery = metrics.eventDelivery ?? {};
  $("m-connections").textContent = String(connections.active ?? "–");
  $("m-throughput").textContent = number(throughput.messagesPerSecond);
  $("m-p50").textContent = number(delivery.p50, 2);
  $("m-p99").textContent = number(delivery.p99, 2);
  const series = panel.metrics;
  addPoint(series.p50, delivery.p50 ?? 0);
  addPoint(series.p99, delivery.p99 ?? 0);
  addPoint(series.messages, throughput.messagesPerSecond ?? 0);
  addPoint(series.deliveries, throughput.deliveriesPerSecond ?? 0);
  const counters = metrics.counters ?? {};
  const errors = Object.values(metrics.errors ?? {}).reduce((sum, n) => sum + n, 0);
  const rss = metrics.resources?.rssBytes;
  $("metrics-detail").textContent = [
    `uptime ${number(metrics.uptimeSeconds, 0)} s`,
    brokerSummary(metrics.router ?? {}),
    `connections ${connections.total ?? "–"} total, ${connections.failed ?? "–"} failed`,
    `${counters.eventsPublished ?? "–"} events published`,
    `${counters.deliveries ?? "–"} deliveries`,
    `${errors} errors`,
    rss ? `${(rss / 1048576).toFixed(0)} MiB RSS` : null,
    `percentiles since start (${delivery.count ?? 0} deliveries timed)`,
  ].filter(Boolean).join(" · ");
  redraw();
}

/** Which broker the node uses and, for a shared one, whether it answers and how far behind the node is. */
function brokerSummary(router) {
  if (!router.engine) return null;
  if (router.engine === "memory") return "broker memory";
  const state = router.ready ? "ready" : "UNREACHABLE";
  return `broker ${router.engine} ${state}, ${router.followedChannels ?? "–"} channels followed, live lag ${number(router.liveLagSeconds, 1)} s`;
}

function number(value, digits = 1) {
  return typeof value === "number" ? value.toFixed(digits) : "–";
}

// -- charts ----------------------------------------------------------------------------

function addPoint(series, value) {
  const now = Date.now();
  series.push({ t: now, v: value });
  while (series.length && series[0].t < now - CHART_SPAN_MS) series.shift();
}

function niceCeiling(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  return [1, 2, 2.5, 5, 10].map((step) => step * power).find((limit) => limit >= value);
}

function drawChart(canvas, lines, unit) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (!width || !height) return;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const g = canvas.getContext("2d");
  g.scale(ratio, ratio);
  const style = getComputedStyle(document.documentElement);
  const color = (name) => style.getPropertyValue(name).trim();
  const left = 44;
  const right = width - 8;
  const top = 8;
  const bottom = height - 18;
  const now = Date.now();
  // The window grows with the data up to CHART_SPAN_MS, so a young chart is not a sliver.
  const first = Math.min(now, ...lines.flatMap(({ series }) => series.slice(0, 1).map((p) => p.t)));
  const span = Math.min(CHART_SPAN_MS, Math.max(MIN_SPAN_MS, now - first));
  const max = niceCeiling(Math.max(0, ...lines.flatMap(({ series }) => series.map((p) => p.v))));
  const x = (t) => left + ((t - (now - span)) / span) * (right - left);
  const y = (v) => bottom - (Math.max(0, Math.min(v, max)) / max) * (bottom - top);
  g.font = `11px ${style.getPropertyValue("--mono").trim() || "monospace"}`;
  g.lineWidth = 1;
  g.textBaseline = "middle";
  for (const fraction of [0, 0.5, 1]) {
    const v = max * fraction;
    g.strokeStyle = color("--grid");
    g.beginPath();
    g.moveTo(left, Math.round(y(v)) + 0.5);
    g.lineTo(right, Math.round(y(v)) + 0.5);
    g.stroke();
    g.fillStyle = color("--muted");
    g.textAlign = "right";
    g.fillText(`${+v.toPrecision(3)}`, left - 6, y(v));
  }
  g.textAlign = "left";
  g.fillText(unit, 2, top + 2);
  g.textBaseline = "bottom";
  g.fillText(`−${Math.round(span / 1000)} s`, left, height);
  g.textAlign = "right";
  g.fillText("now", right, height);
  for (const { series, colorName } of lines) {
    if (!series.length) continue;
    g.strokeStyle = color(colorName);
    g.fillStyle = color(colorName);
    g.lineWidth = 1.75;
    g.lineJoin = "round";
    g.beginPath();
    series.forEach((p, i) => (i ? g.lineTo(x(p.t), y(p.v)) : g.moveTo(x(p.t), y(p.v))));
    g.stroke();
    const last = series[series.length - 1];
    g.beginPath();
    g.arc(x(last.t), y(last.v), 2.5, 0, 2 * Math.PI);
    g.fill();
  }
}

function redraw() {
  drawChart($("latency-chart"), [
    { series: panel.rtt, colorName: "--s1" },
    { series: panel.delivery, colorName: "--s2" },
  ], "ms");
  if (!$("metrics-body").hidden) {
    drawChart($("metrics-latency-chart"), [
      { series: panel.metrics.p50, colorName: "--s3" },
      { series: panel.metrics.p99, colorName: "--s4" },
    ], "ms");
    drawChart($("metrics-throughput-chart"), [
      { series: panel.metrics.messages, colorName: "--s1" },
      { series: panel.metrics.deliveries, colorName: "--s2" },
    ], "/s");
  }
}

// -- helpers and start -----------------------------------------------------------------

function cell(content, className = "") {
  const td = document.createElement("td");
  if (className) td.className = className;
  if (content instanceof Node) td.append(content);
  else td.textContent = String(content);
  return td;
}

function start() {
  const token = tokenFromAddress();
  if (token) $("token").value = token;
  $("connect-form").addEventListener("submit", (event) => {
    event.preventDefault();
    connect();
  });
  $("disconnect").addEventListener("click", disconnect);
  $("join-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = $("channel-name");
    join(input.value.trim());
    input.value = "";
  });
  $("log-filter").addEventListener("change", renderLog);
  $("pause").addEventListener("click", togglePause);
  $("clear").addEventListener("click", () => {
    panel.log = [];
    panel.held = [];
    renderLog();
  });
  setInterval(pollMetrics, METRICS_INTERVAL_MS);
  setInterval(checkHealth, HEALTH_INTERVAL_MS);
  setInterval(redraw, REDRAW_INTERVAL_MS);
  checkHealth();
  connect();
}

start();
