// kaldrix browser client: protocol v1 (spec/PROTOCOL.md) over the browser's WebSocket.
//
// A dependency-free ES module, served by every kaldrix server at /kaldrix.js:
//
//   import { KaldrixClient } from "/kaldrix.js";
//   const client = new KaldrixClient({ token, channels: ["blocks"] });
//   const off = client.on("NEW_BLOCK", (event, meta) => console.log(event.payload.height));
//   client.connect();
//
// It reconnects with full-jitter exponential backoff and resumes every channel from the
// last offset it saw (SUBSCRIBE with `since`), so handlers see each event once and in
// order; what the server cannot replay is reported as a "gap". `getState()` and
// `onState()` fit React's useSyncExternalStore as they are.

export const PROTOCOL_VERSION = "1.0.0";

export const EVENT_TYPES = Object.freeze([
  "NEW_BLOCK", "DAG_UPDATE", "VALIDATOR_EVENT", "TX_RECEIVED", "NODE_STATUS", "ALERT_TRIGGERED",
]);

export const PUBLIC_CHANNELS = Object.freeze(["blocks", "dag", "validators", "transactions", "nodes", "alerts"]);

export const CloseCode = Object.freeze({
  NORMAL: 1000, GOING_AWAY: 1001, ABNORMAL: 1006, POLICY: 1008, TOO_BIG: 1009, INTERNAL: 1011,
  RESTART: 1012, AUTH_FAILED: 4001, FORBIDDEN: 4003, SLOW_CONSUMER: 4008, RATE_LIMITED: 4029,
});

export const GapReason = Object.freeze({
  EPOCH_CHANGED: "epoch_changed", // the channel's history was lost: offsets start over
  HISTORY_TRIMMED: "history_trimmed", // the server no longer holds the missed events
  OFFSET_SKIPPED: "offset_skipped", // an event arrived past the next expected offset
});

const CLOSE_MEANINGS = {
  1000: "closed", 1001: "server shutting down", 1006: "connection lost", 1008: "policy violation",
  1009: "message too big", 1011: "server error", 1012: "server restarting", 4000: "no answer to PING",
  4001: "authentication failed", 4003: "forbidden", 4008: "slow consumer", 4029: "rate limited",
};

const REPLY_OF = { PING: "PONG", REQUEST_METRICS: "METRICS_RESPONSE" };

const DEFAULTS = Object.freeze({
  url: null, // default: ws(s)://<this page's host>/ws
  token: null, // a string, or a function (may be async) asked before each connect
  channels: [],
  autoReconnect: true,
  reconnectInterval: 1000, // ms: base of the backoff, the first retry waits up to this long
  maxReconnectDelay: 30000,
  maxReconnectAttempts: Infinity, // consecutive failed attempts before giving up
  connectTimeout: 10000, // ms from opening the socket to WELCOME
  requestTimeout: 10000, // ms for an ACK, PONG or METRICS_RESPONSE
  pingInterval: 15000, // ms between application PINGs (latency, dead links); 0: never
  pingTimeout: 10000,
  enableThrottle: false, // per event type: at most one handler call per throttleTime
  throttleTime: 100,
  enableDebounce: false, // per event type: only the last event of a burst, debounceTime after it
  debounceTime: 200,
  WebSocket: globalThis.WebSocket,
  random: Math.random,
});

/** An ERROR reply (`fromServer`), or a request that could not complete (NOT_CONNECTED, TIMEOUT, CONNECTION_LOST). */
export class KaldrixError extends Error {
  constructor(code, message, details = {}) {
    super(`${code}: ${message}`);
    this.name = "KaldrixError";
    this.code = code;
    this.path = details.path ?? null;
    this.ref = details.ref ?? null;
    this.fromServer = details.fromServer ?? false;
  }
}

/** Milliseconds to wait before reconnect attempt `attempt` (0 first): uniform in [0, min(max, base*2^attempt)]. */
export function backoffDelay(attempt, base, maxDelay, random = Math.random) {
  return random() * Math.min(maxDelay, base * 2 ** Math.min(attempt, 64));
}

const RFC3339 = /^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(?:([Zz])|([+-])(\d{2}):(\d{2}))$/;

/** An RFC 3339 timestamp as epoch milliseconds, keeping the microseconds Date.parse may drop; NaN if malformed. */
export function parseTimestamp(text) {
  const m = typeof text === "string" ? RFC3339.exec(text) : null;
  if (!m) return NaN;
  const base = Date.UTC(+m[1], +m[2] - 1, +m[3], +m[4], +m[5], +m[6]);
  const fraction = m[7] ? Number(`0.${m[7]}`) * 1000 : 0;
  const offset = m[8] ? 0 : (m[9] === "-" ? -1 : 1) * (+m[10] * 60 + +m[11]) * 60000;
  return base + fraction - offset;
}

/** now - the event's envelope timestamp (when the gateway accepted it), in ms; null if unknown. */
export function deliveryLatency(event, now = Date.now()) {
  const accepted = parseTimestamp(event?.timestamp);
  return Number.isFinite(accepted) ? now - accepted : null;
}

/** What a close code means, for people. */
export function describeClose(code, reason = "") {
  const meaning = CLOSE_MEANINGS[code] ?? "closed";
  return reason && reason !== meaning ? `${meaning} (${code}: ${reason})` : `${meaning} (${code})`;
}

function defaultUrl() {
  const location = globalThis.location;
  if (!location) throw new TypeError("KaldrixClient needs a url outside a web page");
  return `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/ws`;
}

function withToken(url, token) {
  if (!token) return url;
  const parsed = new URL(url, globalThis.location?.href);
  parsed.searchParams.set("token", token);
  return parsed.toString();
}

function report(error) {
  if (typeof globalThis.reportError === "function") globalThis.reportError(error);
  else console.error(error);
}

/**
 * A connection to a kaldrix gateway that survives disconnects.
 *
 * Listen with `on(name, handler)`, which returns the function that removes the handler:
 *   an event type ("NEW_BLOCK", ...) or "*" for every event: handler(event, {replayed, latency});
 *   "state": handler(state) on every change;  "gap": handler({channel, lastOffset, epoch, newOffset, newEpoch, reason});
 *   "frame": handler({direction: "in"|"out", message, size}) for every message, both ways;
 *   "welcome": handler(payload);  "error": handler(KaldrixError) for ERRORs no request was waiting for.
 */
export class KaldrixClient {
  #options;
  #ws = null;
  #listeners = new Map();
  #channels = new Set(); // what the application wants to read
  #subscribed = new Set(); // what the server confirmed on this connection
  #positions = new Map(); // channel -> {offset, epoch} of the last event seen
  #replaying = new Map(); // channel -> replayed events still to come after an ACK
  #waiters = []; // subscribe() calls waiting for their ACK
  #pending = new Map(); // request id -> {type, resolve, reject, timer, sentAt}
  #nextId = 1;
  #syncing = false;
  #opening = false;
  #closing = false;
  #refusal = null; // an ERROR the server sent before closing, e.g. UNAUTHORIZED
  #retryTimer = null;
  #connectTimer = null;
  #pingTimer = null;
  #throttles = new Map();
  #debounces = new Map();
  #state;

  constructor(options = {}) {
    this.#options = { ...DEFAULTS, ...options };
    for (const name of this.#options.channels) this.#channels.add(name);
    this.#state = Object.freeze({
      status: "idle", // idle | connecting | connected | reconnecting | closed | failed
      connected: false,
      error: null,
      reconnectAttempts: 0,
      latency: null, // ms: round trip of the latest PING
      resyncs: 0, // channels subscribed again because a HEARTBEAT showed a missed event
      sessionId: null,
      serverVersion: null,
      user: null,
      channels: [...this.#channels],
    });
    // Bound, so that React's useSyncExternalStore(client.onState, client.getState) works as is.
    this.getState = this.getState.bind(this);
    this.onState = this.onState.bind(this);
  }

  /** The current state, a frozen object replaced (never changed) on every change. */
  get state() {
    return this.#state;
  }

  getState() {
    return this.#state;
  }

  onState(listener) {
    return this.on("state", listener);
  }

  /** The last (offset, epoch) seen per channel: where a reconnect resumes. */
  get positions() {
    return Object.fromEntries([...this.#positions].map(([name, at]) => [name, { ...at }]));
  }

  on(name, handler) {
    if (typeof handler !== "function") throw new TypeError("handler must be a function");
    if (!this.#listeners.has(name)) this.#listeners.set(name, new Set());
    this.#listeners.get(name).add(handler);
    return () => this.#listeners.get(name)?.delete(handler);
  }

  /** Open the connection (again, after close()); a no-op while it is open or opening. */
  connect() {
    if (this.#ws || this.#retryTimer || this.#opening) return this;
    this.#closing = false;
    if (this.#state.status === "closed" || this.#state.status === "failed") this.#setState({ reconnectAttempts: 0 });
    this.#open();
    return this;
  }

  /** Close for good: no reconnect. Pending requests fail with CONNECTION_LOST. */
  close(code = CloseCode.NORMAL, reason = "client closed") {
    this.#closing = true;
    clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    const ws = this.#ws;
    if (ws) {
      this.#ws = null;
      this.#connectionEnded();
      ws.close(code, reason);
    }
    this.#rejectWaiters(new KaldrixError("CONNECTION_LOST", "the client was closed"));
    this.#setState({ status: "closed", connected: false });
  }

  /** Read channels: resolves with {channel: {offset, epoch, recovered, replayed}} once the server acknowledged them. */
  subscribe(...names) {
    const channels = names.flat();
    for (const name of channels) this.#channels.add(name);
    this.#setState({ channels: [...this.#channels] });
    const promise = new Promise((resolve, reject) => {
      this.#waiters.push({ channels, positions: {}, resolve, reject });
    });
    this.#settleWaiters();
    this.#sync();
    return promise;
  }

  /** Stop reading channels; their events stop at once, and a later subscribe starts from live. */
  unsubscribe(...names) {
    const channels = names.flat().filter((name) => this.#channels.has(name));
    for (const name of channels) {
      this.#channels.delete(name);
      this.#positions.delete(name);
      this.#replaying.delete(name);
    }
    this.#setState({ channels: [...this.#channels] });
    this.#settleWaiters();
    const held = channels.filter((name) => this.#subscribed.delete(name));
    if (!held.length || !this.#ws) return Promise.resolve(null);
    return this.#request("UNSUBSCRIBE", { channels: held });
  }

  /** One application PING: resolves with the round trip in ms (also kept as state.latency). */
  async ping() {
    const { rtt } = await this.#request("PING", { t: Date.now() }, this.#options.pingTimeout);
    this.#setState({ latency: rtt });
    return rtt;
  }

  /** The server's metrics (admins, or anyone in open mode): the METRICS_RESPONSE `metrics`. */
  async requestMetrics(type = "all") {
    const payload = await this.#request("REQUEST_METRICS", { type });
    return payload.metrics;
  }

  /** PUBLISH one event ({type, payload, id?}) or several; resolves with the ACK payload. */
  publish(events, { channel } = {}) {
    const payload = Array.isArray(events) ? { events } : { event: events };
    if (channel) payload.channel = channel;
    return this.#request("PUBLISH", payload);
  }

  /** AUTH: authenticate, or refresh the token of, the open connection. */
  auth(token) {
    return this.#request("AUTH", { token });
  }

  /** Send any command; resolves with its reply's payload, rejects with a KaldrixError. */
  request(type, payload = {}) {
    return this.#request(type, payload);
  }

  // -- connection --------------------------------------------------------------------

  async #open() {
    this.#retryTimer = null;
    this.#refusal = null;
    this.#opening = true;
    const options = this.#options;
    this.#setState({ status: this.#state.reconnectAttempts ? "reconnecting" : "connecting" });
    let token = options.token;
    let ws;
    try {
      if (typeof token === "function") token = await token();
      if (this.#closing) return;
      ws = new options.WebSocket(withToken(options.url ?? defaultUrl(), token));
    } catch (error) {
      this.#ended(CloseCode.ABNORMAL, String(error?.message ?? error), false);
      return;
    } finally {
      this.#opening = false;
    }
    this.#ws = ws;
    let opened = false;
    this.#connectTimer = setTimeout(() => ws.close(4000, "no WELCOME"), options.connectTimeout);
    ws.onopen = () => {
      opened = true;
    };
    ws.onmessage = (message) => this.#ws === ws && this.#receive(message.data);
    ws.onclose = (close) => {
      if (this.#ws !== ws) return;
      this.#ws = null;
      this.#connectionEnded();
      this.#ended(close.code, close.reason, opened);
    };
  }

  #connectionEnded() {
    clearTimeout(this.#connectTimer);
    clearInterval(this.#pingTimer);
    this.#subscribed.clear();
    this.#replaying.clear();
    this.#syncing = false;
    for (const [, request] of this.#pending) {
      clearTimeout(request.timer);
      request.reject(new KaldrixError("CONNECTION_LOST", "the connection closed before the reply"));
    }
    this.#pending.clear();
  }

  #ended(code, reason, opened) {
    if (this.#closing) return;
    const options = this.#options;
    const error = this.#refusal ?? (opened ? describeClose(code, reason) : `cannot connect (${reason || code})`);
    const attempts = this.#state.reconnectAttempts;
    let giveUp = null;
    if (code === CloseCode.AUTH_FAILED && typeof options.token !== "function") giveUp = "the token was refused";
    else if (code === CloseCode.FORBIDDEN) giveUp = "forbidden";
    else if (!options.autoReconnect) giveUp = "autoReconnect is off";
    else if (attempts >= options.maxReconnectAttempts) giveUp = `gave up after ${attempts} attempts`;
    if (giveUp) {
      this.#setState({ status: "failed", connected: false, error: `${error}; not reconnecting: ${giveUp}` });
      this.#rejectWaiters(new KaldrixError("CONNECTION_LOST", error));
      return;
    }
    const delay = backoffDelay(attempts, options.reconnectInterval, options.maxReconnectDelay, options.random);
    this.#setState({ status: "reconnecting", connected: false, error, reconnectAttempts: attempts + 1 });
    this.#retryTimer = setTimeout(() => this.#open(), delay);
  }

  #send(message) {
    const text = JSON.stringify(message);
    this.#ws.send(text);
    this.#emit("frame", { direction: "out", message, size: text.length });
  }

  #request(type, payload, timeout = this.#options.requestTimeout) {
    if (!this.#ws || this.#ws.readyState !== 1) {
      return Promise.reject(new KaldrixError("NOT_CONNECTED", `cannot send ${type}: not connected`));
    }
    const id = `k${this.#nextId++}`;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pending.delete(id);
        reject(new KaldrixError("TIMEOUT", `no reply to ${type} within ${timeout} ms`));
        if (type === "PING" && this.#ws) this.#ws.close(4000, "no answer to PING");
      }, timeout);
      this.#pending.set(id, { type, resolve, reject, timer, sentAt: performance.now() });
      this.#send({ type, id, payload });
    });
  }

  // -- receiving --------------------------------------------------------------------

  #receive(data) {
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      return; // the server only sends JSON; anything else is not ours to read
    }
    if (message === null || typeof message !== "object") return;
    this.#emit("frame", { direction: "in", message, size: data.length });
    const payload = message.payload ?? {};
    switch (message.type) {
      case "WELCOME":
        return this.#welcome(payload);
      case "ACK":
      case "PONG":
      case "METRICS_RESPONSE":
        return this.#reply(message.type, payload);
      case "ERROR":
        return this.#error(payload);
      case "HEARTBEAT":
        return this.#heartbeat(payload);
      default:
        if (typeof message.channel === "string") this.#admit(message);
      // other types are from a later 1.x server: ignored, as the protocol asks
    }
  }

  #welcome(payload) {
    clearTimeout(this.#connectTimer);
    this.#setState({
      status: "connected",
      connected: true,
      error: null,
      sessionId: payload.sessionId ?? null,
      serverVersion: payload.serverVersion ?? null,
      user: payload.user ?? null,
    });
    this.#emit("welcome", payload);
    const interval = this.#options.pingInterval;
    if (interval > 0) this.#pingTimer = setInterval(() => this.ping().catch(() => {}), interval);
    this.#sync(true);
  }

  #reply(type, payload) {
    let id = payload.ref;
    if (!this.#pending.has(id)) {
      // A server that leaves `ref` out answers PINGs and metrics requests in order.
      id = [...this.#pending].find(([, request]) => REPLY_OF[request.type] === type)?.[0];
    }
    const request = this.#pending.get(id);
    if (!request) return;
    this.#pending.delete(id);
    clearTimeout(request.timer);
    if (type === "PONG") request.resolve({ ...payload, rtt: performance.now() - request.sentAt });
    else request.resolve(payload);
  }

  #error(payload) {
    const error = new KaldrixError(payload.code ?? "ERROR", payload.message ?? "refused", { ...payload, fromServer: true });
    const request = this.#pending.get(payload.ref);
    if (request) {
      this.#pending.delete(payload.ref);
      clearTimeout(request.timer);
      request.reject(error);
      return;
    }
    if (error.code === "UNAUTHORIZED") this.#refusal = error.message;
    this.#setState({ error: error.message });
    this.#emit("error", error);
  }

  #admit(event) {
    const channel = event.channel;
    if (!this.#channels.has(channel)) return; // left: what was already on its way is dropped
    const left = this.#replaying.get(channel) ?? 0;
    const replayed = left > 0;
    if (replayed) this.#replaying.set(channel, left - 1);
    const last = this.#positions.get(channel);
    if (last) {
      if (event.epoch === last.epoch && event.offset <= last.offset) return; // a duplicate
      if (event.epoch !== last.epoch) {
        this.#gap(channel, last, event.offset - 1, event.epoch, GapReason.EPOCH_CHANGED);
      } else if (event.offset !== last.offset + 1) {
        this.#gap(channel, last, event.offset - 1, event.epoch, GapReason.OFFSET_SKIPPED);
      }
    }
    this.#positions.set(channel, { offset: event.offset, epoch: event.epoch });
    // A replayed event keeps its original timestamp: it says nothing about delivery latency.
    this.#deliver(event, { replayed, latency: replayed ? null : deliveryLatency(event) });
  }

  /**
   * A quiet channel's HEARTBEAT carries its latest position, and every event up to it was
   * sent before it: a client whose last event differs missed something (or the stream
   * started a new epoch), so it subscribes again from its last offset, which brings the
   * missed events or reports the gap.
   */
  #heartbeat({ channel, offset, epoch }) {
    if (!this.#subscribed.has(channel) || (this.#replaying.get(channel) ?? 0) > 0) return;
    const last = this.#positions.get(channel);
    if (!last || (last.offset === offset && last.epoch === epoch)) return;
    this.#subscribed.delete(channel);
    this.#setState({ resyncs: this.#state.resyncs + 1 });
    this.#sync();
  }

  #gap(channel, last, newOffset, newEpoch, reason) {
    this.#emit("gap", { channel, lastOffset: last.offset, epoch: last.epoch, newOffset, newEpoch, reason });
  }

  // -- channels ---------------------------------------------------------------------

  /** Subscribe this connection to every wanted channel it does not hold yet, with `since` where known. */
  async #sync(resuming = false) {
    if (this.#syncing || !this.#state.connected) return;
    this.#syncing = true;
    const ws = this.#ws;
    try {
      for (;;) {
        const channels = [...this.#channels].filter((name) => !this.#subscribed.has(name));
        if (!channels.length) break;
        const payload = { channels };
        const since = {};
        for (const name of channels) {
          if (this.#positions.has(name)) since[name] = this.#positions.get(name);
        }
        if (Object.keys(since).length) payload.since = since;
        try {
          const ack = await this.#request("SUBSCRIBE", payload);
          this.#acknowledged(ack.channels ?? {});
        } catch (error) {
          if (this.#ws !== ws || !error?.fromServer) throw error;
          // The command is atomic: drop the refused channel (or all of them) and try the rest.
          const index = /^payload\.channels\[(\d+)\]$/.exec(error.path ?? "")?.[1];
          const refused = index !== undefined && channels[+index] ? [channels[+index]] : channels;
          for (const name of refused) this.#channels.delete(name);
          this.#setState({ channels: [...this.#channels], error: `cannot subscribe to ${refused.join(", ")}: ${error.message}` });
          this.#rejectWaiters(error, refused);
        }
      }
      if (resuming) this.#setState({ reconnectAttempts: 0 });
    } catch (error) {
      // Lost with the connection: the next one syncs again. A silent server is treated as lost.
      if (this.#ws === ws && error?.code === "TIMEOUT") ws.close(4000, "no answer to SUBSCRIBE");
    } finally {
      if (this.#ws === ws) this.#syncing = false;
    }
  }

  #acknowledged(positions) {
    const unwanted = [];
    for (const [name, at] of Object.entries(positions)) {
      if (!this.#channels.has(name)) {
        unwanted.push(name); // left while the SUBSCRIBE was on its way
        continue;
      }
      this.#subscribed.add(name);
      this.#replaying.set(name, at.replayed ?? 0);
      for (const waiter of this.#waiters) if (waiter.channels.includes(name)) waiter.positions[name] = at;
      const last = this.#positions.get(name);
      if (!last || at.recovered) {
        // A first join starts from now; a recovered one advances as the replay arrives.
        if (!last) this.#positions.set(name, { offset: at.offset, epoch: at.epoch });
        continue;
      }
      this.#positions.set(name, { offset: at.offset, epoch: at.epoch });
      if (last.offset !== at.offset || last.epoch !== at.epoch) {
        const reason = last.epoch !== at.epoch ? GapReason.EPOCH_CHANGED : GapReason.HISTORY_TRIMMED;
        this.#gap(name, last, at.offset, at.epoch, reason);
      }
    }
    if (unwanted.length) this.#request("UNSUBSCRIBE", { channels: unwanted }).catch(() => {});
    this.#settleWaiters();
  }

  #settleWaiters() {
    this.#waiters = this.#waiters.filter((waiter) => {
      const done = waiter.channels.every((name) => this.#subscribed.has(name) || !this.#channels.has(name));
      if (done) waiter.resolve(waiter.positions);
      return !done;
    });
  }

  #rejectWaiters(error, channels = null) {
    this.#waiters = this.#waiters.filter((waiter) => {
      const hit = channels === null || waiter.channels.some((name) => channels.includes(name));
      if (hit) waiter.reject(error);
      return !hit;
    });
  }

  // -- handlers ---------------------------------------------------------------------

  #deliver(event, meta) {
    const options = this.#options;
    if (!options.enableDebounce) return this.#throttled(event, meta);
    clearTimeout(this.#debounces.get(event.type));
    this.#debounces.set(event.type, setTimeout(() => {
      this.#debounces.delete(event.type);
      this.#throttled(event, meta);
    }, options.debounceTime));
  }

  #throttled(event, meta) {
    const options = this.#options;
    if (!options.enableThrottle) return this.#dispatch(event, meta);
    const slot = this.#throttles.get(event.type);
    if (slot) {
      slot.latest = [event, meta]; // the latest of the window goes out at its end
      return;
    }
    this.#dispatch(event, meta);
    const open = { latest: null };
    const flush = () => {
      if (!open.latest) return this.#throttles.delete(event.type);
      this.#dispatch(...open.latest);
      open.latest = null;
      setTimeout(flush, options.throttleTime);
    };
    this.#throttles.set(event.type, open);
    setTimeout(flush, options.throttleTime);
  }

  #dispatch(event, meta) {
    this.#emit(event.type, event, meta);
    this.#emit("*", event, meta);
  }

  #emit(name, ...args) {
    const listeners = this.#listeners.get(name);
    if (!listeners) return;
    for (const listener of [...listeners]) {
      try {
        listener(...args);
      } catch (error) {
        report(error); // one failing handler must not stop the others, nor the client
      }
    }
  }

  #setState(changes) {
    this.#state = Object.freeze({ ...this.#state, ...changes });
    this.#emit("state", this.#state);
  }
}

/** A connected client in one call: `connect({token, channels: ["blocks"]})`. */
export function connect(options = {}) {
  return new KaldrixClient(options).connect();
}
