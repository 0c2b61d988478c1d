// Test doubles for winkr-client.js: a clock whose time moves only when a test says so, and a
// WebSocket whose "server side" the test plays frame by frame.

/** Let every pending promise callback and I/O callback run. */
export const flush = async () => {
  for (let i = 0; i < 5; i++) await new Promise((resolve) => setImmediate(resolve));
};

export class FakeClock {
  constructor() {
    this.time = 1_700_000_000_000;
    this.nextId = 1;
    /** @type {Map<number, {at: number, fn: () => void}>} */
    this.timers = new Map();
    this.setTimeout = (/** @type {() => void} */ fn, /** @type {number} */ ms) => {
      const id = this.nextId++;
      this.timers.set(id, { at: this.time + Math.max(0, ms), fn });
      return id;
    };
    this.clearTimeout = (/** @type {any} */ id) => {
      this.timers.delete(id);
    };
    this.now = () => this.time;
  }

  /** Move time forward by `ms`, firing due timers in order (and letting promises settle). */
  async advance(ms) {
    const end = this.time + ms;
    await flush();
    for (;;) {
      let next = null;
      for (const [id, t] of this.timers) if (t.at <= end && (next === null || t.at < next[1].at)) next = [id, t];
      if (next === null) break;
      this.timers.delete(next[0]);
      this.time = next[1].at;
      next[1].fn();
      await flush();
    }
    this.time = end;
    await flush();
  }
}

/** A fake server: every socket the client opens lands in `sockets`. */
export class FakeServer {
  constructor() {
    /** @type {FakeSocket[]} */
    this.sockets = [];
    const server = this;
    this.WebSocket = class extends FakeSocket {
      constructor(/** @type {string} */ url, /** @type {string[]} */ protocols) {
        super(url, protocols);
        server.sockets.push(this);
      }
    };
  }

  get last() {
    return this.sockets[this.sockets.length - 1];
  }
}

export class FakeSocket {
  constructor(/** @type {string} */ url, /** @type {string[]} */ protocols) {
    this.url = url;
    this.protocols = protocols;
    /** @type {any[]} */
    this.sent = [];
    this.readyState = 0;
    this.consumed = 0;
    /** @type {Map<string, Function[]>} */
    this.listeners = new Map();
    /** @type {any} */ this.onmessage = null;
    /** @type {any} */ this.onclose = null;
    /** @type {any} */ this.onerror = null;
    this.closedWith = null;
  }

  get token() {
    return this.protocols[1].slice("bearer.".length);
  }

  // --- the client's side ---
  send(/** @type {string} */ text) {
    if (this.readyState !== 1) throw new Error("not open");
    this.sent.push(JSON.parse(text));
  }

  close(/** @type {number} */ code = 1005, /** @type {string} */ reason = "") {
    if (this.readyState === 3) return;
    this.closedWith = { code, reason };
    this.readyState = 3;
    setImmediate(() => this._fireClose(code, reason));
  }

  addEventListener(/** @type {string} */ type, /** @type {Function} */ fn) {
    if (!this.listeners.has(type)) this.listeners.set(type, []);
    this.listeners.get(type)?.push(fn);
  }

  // --- the server's side ---
  /** Accept the handshake and say connection:established. */
  accept(userId = "alice") {
    this.readyState = 1;
    this.deliver({ event: "connection:established", data: { user_id: userId, connection_id: "c1" } });
  }

  /** Refuse the handshake (what a browser sees for a 401: an error, then close 1006). */
  refuse() {
    this.readyState = 3;
    this._fireClose(1006, "");
  }

  deliver(/** @type {any} */ envelope) {
    this.onmessage?.({ data: JSON.stringify({ timestamp: "2026-01-01T00:00:00.000Z", ...envelope }) });
  }

  /** The server closes, optionally after connection:closed (as the real one does). */
  serverClose(/** @type {number} */ code, /** @type {string | null} */ reason = null) {
    if (reason) this.deliver({ event: "connection:closed", data: { reason, code } });
    this.readyState = 3;
    this._fireClose(code, reason ?? "");
  }

  _fireClose(/** @type {number} */ code, /** @type {string} */ reason) {
    this.onclose?.({ code, reason });
    for (const fn of this.listeners.get("close") ?? []) fn({ code, reason });
  }

  /** Frames of `event` sent since the last call that took them. */
  take(/** @type {string} */ event) {
    const found = this.sent.filter((f) => f.event === event && !f._taken);
    for (const f of found) f._taken = true;
    return found;
  }

  /** The one not-yet-taken frame of `event` (fails otherwise). */
  one(/** @type {string} */ event) {
    const found = this.take(event);
    if (found.length !== 1) throw new Error(`expected one ${event}, got ${JSON.stringify(this.sent)}`);
    return found[0];
  }

  /** Reply to a request frame (echoing its ref). */
  reply(/** @type {any} */ frame, /** @type {string} */ event, /** @type {any} */ data) {
    this.deliver({ event, data, ref: frame.ref });
  }
}

/** An unsigned JWT whose payload the client can read (it never verifies). */
export function fakeJwt(/** @type {Record<string, any>} */ claims) {
  const b64 = (/** @type {any} */ obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
  return `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}.c2ln`;
}

/** A message object as the server sends it. */
export function msg(/** @type {string} */ conversationId, /** @type {number} */ seq, sender = "bob", extra = {}) {
  return {
    id: `${conversationId}.${seq}`, conversation_id: conversationId, seq, sender_id: sender, type: "text",
    content: `m${seq}`, metadata: {}, created_at: "2026-01-01T00:00:00.000Z",
    updated_at: "2026-01-01T00:00:00.000Z", is_read: false, is_deleted: false, ...extra,
  };
}

export function newMessage(/** @type {string} */ conversationId, /** @type {number} */ seq, sender = "bob", extra = {}) {
  return {
    event: "message:new",
    data: { message: msg(conversationId, seq, sender, extra), sender: { id: sender, username: sender, avatar_url: null } },
  };
}
