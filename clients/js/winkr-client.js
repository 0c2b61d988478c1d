// @ts-check
/**
 * winkr-client.js — the Winkr realtime client (contract §15): one ES module, no runtime
 * dependencies, for browsers and for Node.js (pass a WebSocket implementation).
 *
 *   import { WinkrClient } from "./winkr-client.js";
 *   const client = new WinkrClient({ url: "wss://chat.example.com/ws", token: getToken });
 *   client.on("message:new", ({ message }) => render(message));
 *   await client.connect();
 *   await client.join(conversationId);
 *   await client.sendMessage(conversationId, "Hey!");
 *
 * What it does for the app (docs/clients.md has the details):
 * - reconnects with exponential backoff and full jitter (first attempt within 1 s, capped at
 *   30 s), except after refusals that will not change (4004; 4001 or an expired token
 *   without a token function; a first connect() that fails);
 * - after reconnecting, re-joins the joined conversations and catches each up with
 *   `message:history after_seq`, so `message:new` fires exactly once per message of a joined
 *   conversation, in `seq` order, the app's own messages included;
 * - queues sends while disconnected and always gives them a `client_message_id`, so a resend
 *   never duplicates;
 * - debounces typing (`typing:start` once per burst, repeated every 4 s during a long one,
 *   `typing:stop` after 3 s without a keystroke);
 * - calls a token function again to reconnect and to send `auth:refresh` before `exp`;
 * - keeps a bounded cache of recent messages per conversation behind a replaceable interface;
 * - optionally closes while the page is hidden and reconnects when it is visible again.
 */

/** The library's version (sent nowhere; for the app's diagnostics). */
export const VERSION = "1.0.0";

/** @typedef {"connecting" | "open" | "reconnecting" | "closed"} ClientState */

/**
 * A message as the server stores it (docs/protocol.md §5).
 * @typedef {Object} Message
 * @property {string} id  opaque: `"<conversation_id>.<seq>"`
 * @property {string} conversation_id
 * @property {number} seq  1, 2, 3, … per conversation, no gaps
 * @property {string} sender_id
 * @property {string} type  text | photo | photo_ephemeral | location | gift | system
 * @property {string} content
 * @property {Record<string, any>} metadata
 * @property {string} created_at
 * @property {string} updated_at
 * @property {boolean} is_read
 * @property {boolean} is_deleted
 * @property {string} [client_message_id]
 */

/**
 * A server → client frame.
 * @typedef {Object} Envelope
 * @property {string} event
 * @property {Record<string, any>} data
 * @property {string} [timestamp]
 * @property {string} [ref]  present on the direct reply to a request
 * @property {boolean} [replayed]  set by the client on `message:new` rebuilt from history
 */

/**
 * @typedef {Object} HistoryQuery
 * @property {number} [beforeSeq]
 * @property {number} [afterSeq]
 * @property {number} [limit]  1–100 (server default 50)
 */

/**
 * @typedef {Object} HistoryPage
 * @property {Message[]} messages  ascending `seq`
 * @property {boolean} has_more
 */

/**
 * Where the client keeps recent messages. Every method may return a Promise (an IndexedDB
 * cache would), and the client never lets a cache failure break the connection.
 * @typedef {Object} MessageCache
 * @property {(conversationId: string, messages: Message[]) => (void | Promise<void>)} put
 *   insert or replace by `seq`
 * @property {(conversationId: string, query?: HistoryQuery) => (Message[] | Promise<Message[]>)} get
 *   like `history`: the newest `limit` messages in the range, ascending `seq`
 * @property {(conversationId: string) => (number | null | Promise<number | null>)} lastSeq
 *   the highest `seq` held, or null
 * @property {(conversationId: string, messageId: string, patch: Partial<Message>) => (void | Promise<void>)} update
 * @property {(conversationId?: string) => (void | Promise<void>)} clear
 */

/**
 * @typedef {Object} Timers  injectable for tests; defaults to the global timers and Date.now
 * @property {(fn: () => void, ms: number) => any} setTimeout
 * @property {(handle: any) => void} clearTimeout
 * @property {() => number} now  milliseconds
 */

/**
 * @typedef {string | (() => string | Promise<string>)} TokenSource
 */

/**
 * @typedef {Object} ClientOptions
 * @property {string} url  `wss://host/ws`
 * @property {TokenSource} token  a JWT, or a function returning one (called before every
 *   connection attempt and for `auth:refresh`)
 * @property {any} [WebSocket]  a WebSocket constructor (default `globalThis.WebSocket`)
 * @property {number} [requestTimeout]  ms before `request()` rejects with `TIMEOUT` (10000)
 * @property {number} [connectTimeout]  ms for one connection attempt (10000)
 * @property {number} [backoffInitial]  ms: the first retry waits up to this (1000)
 * @property {number} [backoffMax]  ms: the cap of the backoff (30000)
 * @property {number} [typingStopAfter]  ms without a keystroke before `typing:stop` (3000)
 * @property {number} [typingRepeat]  ms between repeated `typing:start` in a long burst (4000)
 * @property {number} [refreshMargin]  ms before `exp` to send `auth:refresh` (60000)
 * @property {number} [maxFrameBytes]  refuse to send frames over this many bytes (32768)
 * @property {number | null} [hiddenCloseAfter]  ms hidden before closing; null = never (null)
 * @property {MessageCache} [cache]  default: a MemoryCache of 200 messages per conversation
 * @property {Timers} [timers]
 * @property {() => number} [random]  default Math.random (for the jitter)
 * @property {any} [document]  default `globalThis.document` (for visibility)
 */

/** The error a request rejects with: a server `error`, or one of the client's own codes. */
export class WinkrError extends Error {
  /**
   * @param {string} code  a protocol code (`RATE_LIMITED`, …) or a client code:
   *   `TIMEOUT`, `CONNECTION_ERROR` (the connection ended before the reply), `CLOSED`
   *   (the client was closed), `MESSAGE_TOO_LARGE` (refused before sending)
   * @param {string} message
   * @param {Record<string, any>} [details]
   * @param {Envelope | null} [envelope]  the server's `error` envelope, when there is one
   */
  constructor(code, message, details = {}, envelope = null) {
    super(message);
    this.name = "WinkrError";
    this.code = code;
    this.details = details;
    this.envelope = envelope;
  }
}

/**
 * The default cache: the newest `maxMessages` messages of each of the `maxConversations`
 * most recently used conversations, in memory.
 * @implements {MessageCache}
 */
export class MemoryCache {
  /** @param {{maxMessages?: number, maxConversations?: number}} [options] */
  constructor({ maxMessages = 200, maxConversations = 100 } = {}) {
    this.maxMessages = maxMessages;
    this.maxConversations = maxConversations;
    /** @type {Map<string, Map<number, Message>>} */
    this._conversations = new Map();
  }

  /** @param {string} conversationId */
  _bucket(conversationId) {
    let bucket = this._conversations.get(conversationId);
    if (bucket) {
      this._conversations.delete(conversationId); // most recently used goes last
    } else {
      bucket = new Map();
    }
    this._conversations.set(conversationId, bucket);
    while (this._conversations.size > this.maxConversations) {
      const oldest = this._conversations.keys().next().value;
      if (oldest === undefined) break;
      this._conversations.delete(oldest);
    }
    return bucket;
  }

  /** @param {string} conversationId @param {Message[]} messages */
  put(conversationId, messages) {
    if (!messages.length) return;
    const bucket = this._bucket(conversationId);
    for (const message of messages) bucket.set(message.seq, { ...message });
    if (bucket.size > this.maxMessages) {
      const keep = [...bucket.keys()].sort((a, b) => a - b).slice(-this.maxMessages);
      const kept = new Map(keep.map((seq) => [seq, /** @type {Message} */ (bucket.get(seq))]));
      this._conversations.set(conversationId, kept);
    }
  }

  /** @param {string} conversationId @param {HistoryQuery} [query] @returns {Message[]} */
  get(conversationId, { beforeSeq, afterSeq, limit = 50 } = {}) {
    const bucket = this._conversations.get(conversationId);
    if (!bucket) return [];
    let messages = [...bucket.values()]
      .filter((m) => (beforeSeq == null || m.seq < beforeSeq) && (afterSeq == null || m.seq > afterSeq))
      .sort((a, b) => a.seq - b.seq);
    // As history: after_seq alone reads the oldest page above it, otherwise the newest page.
    messages = afterSeq != null && beforeSeq == null ? messages.slice(0, limit) : messages.slice(-limit);
    return messages.map((m) => ({ ...m }));
  }

  /** @param {string} conversationId @returns {number | null} */
  lastSeq(conversationId) {
    const bucket = this._conversations.get(conversationId);
    if (!bucket || !bucket.size) return null;
    return Math.max(...bucket.keys());
  }

  /** @param {string} conversationId @param {string} messageId @param {Partial<Message>} patch */
  update(conversationId, messageId, patch) {
    const bucket = this._conversations.get(conversationId);
    if (!bucket) return;
    for (const [seq, message] of bucket) {
      if (message.id === messageId) bucket.set(seq, { ...message, ...patch });
    }
  }

  /** @param {string} [conversationId] */
  clear(conversationId) {
    if (conversationId === undefined) this._conversations.clear();
    else this._conversations.delete(conversationId);
  }
}

const SUBPROTOCOL = "winkr.v1";
const CATCH_UP_PAGE = 100;
const MAX_CATCH_UP_ROUNDS = 20; // rounds without progress are bounded, see _catchUp
const FORCED_CLOSE_CODE = 4000; // a close code the app may use; the server ignores it
const CLOSE_DISCONNECTED = 4004;
const CLOSE_TOKEN_EXPIRED = 4001;
const IDEMPOTENT = new Set(["message:read", "message:history", "conversation:list", "conversation:leave",
  "user:status", "user:settings"]);

/** @returns {string} a random id for `client_message_id` */
function newClientMessageId() {
  const c = /** @type {any} */ (globalThis).crypto;
  if (c && typeof c.randomUUID === "function") return c.randomUUID();
  let s = "";
  for (let i = 0; i < 32; i++) s += Math.floor(Math.random() * 16).toString(16);
  return s;
}

/**
 * The `exp` claim of a JWT in milliseconds, read without verifying (only to plan a refresh).
 * @param {string} token @returns {number | null}
 */
export function tokenExpiry(token) {
  try {
    const part = token.split(".")[1];
    const base64 = part.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(part.length / 4) * 4, "=");
    const claims = JSON.parse(atob(base64));
    return typeof claims.exp === "number" ? claims.exp * 1000 : null;
  } catch {
    return null;
  }
}

/** @param {string} text @returns {number} UTF-8 bytes */
function utf8Length(text) {
  return new TextEncoder().encode(text).length;
}

/**
 * @typedef {Object} Pending
 * @property {string} event
 * @property {Record<string, any>} data
 * @property {string | null} ref  set when sent
 * @property {number} generation  the connection it was sent on (-1: not sent)
 * @property {(env: Envelope) => void} resolve
 * @property {(err: WinkrError) => void} reject
 * @property {boolean} resend  send again after a reconnect (idempotent requests)
 * @property {boolean} silent  its reply is not emitted (the client's own catch-up)
 * @property {boolean} stallReconnects  an unanswered send means a dead connection
 * @property {any} timer  its deadline (from the call)
 * @property {any} stallTimer
 * @property {boolean} done
 */

/**
 * @typedef {Object} ConversationSync
 * @property {number | null} lastSeq  the highest `seq` emitted as `message:new`
 * @property {boolean} syncing  a join or catch-up is running
 * @property {Map<number, Envelope>} buffer  live messages that arrived ahead of a gap
 * @property {number} generation  the connection the last successful join was on
 * @property {{resolve: (env: Envelope) => void, reject: (err: WinkrError) => void}[]} waiters
 */

export class WinkrClient {
  /** @param {ClientOptions} options */
  constructor(options) {
    if (!options || typeof options.url !== "string") throw new TypeError("WinkrClient needs {url, token}");
    if (typeof options.token !== "string" && typeof options.token !== "function") {
      throw new TypeError("token must be a string or a function returning one");
    }
    this.url = options.url;
    /** @type {TokenSource} */
    this._token = options.token;
    this._WebSocket = options.WebSocket ?? /** @type {any} */ (globalThis).WebSocket;
    if (typeof this._WebSocket !== "function") {
      throw new TypeError("no WebSocket implementation: pass {WebSocket} (Node.js: the 'ws' package)");
    }
    this.requestTimeout = options.requestTimeout ?? 10000;
    this.connectTimeout = options.connectTimeout ?? 10000;
    this.backoffInitial = options.backoffInitial ?? 1000;
    this.backoffMax = options.backoffMax ?? 30000;
    this.typingStopAfter = options.typingStopAfter ?? 3000;
    this.typingRepeat = options.typingRepeat ?? 4000;
    this.refreshMargin = options.refreshMargin ?? 60000;
    this.maxFrameBytes = options.maxFrameBytes ?? 32768;
    this.hiddenCloseAfter = options.hiddenCloseAfter ?? null;
    /** @type {MessageCache} */
    this.cache = options.cache ?? new MemoryCache();
    /** @type {Timers} */
    this._timers = options.timers ?? {
      setTimeout: (fn, ms) => globalThis.setTimeout(fn, ms),
      clearTimeout: (h) => globalThis.clearTimeout(h),
      now: () => Date.now(),
    };
    this._random = options.random ?? Math.random;
    this._document = options.document ?? /** @type {any} */ (globalThis).document ?? null;

    /** @type {ClientState} */
    this._state = "closed";
    /** @type {string | null} the user id from `connection:established` */
    this.userId = null;
    /** @type {Map<string, Set<Function>>} */
    this._handlers = new Map();
    /** @type {any} */
    this._ws = null;
    this._generation = 0; // bumped for every socket; events of older sockets are ignored
    this._established = false; // the current socket got connection:established
    this._everEstablished = false;
    this._ended = false; // close() was called, or a refusal that will not change
    this._attempt = 0;
    this._suspended = false; // closed while the page is hidden
    /** @type {any} */ this._connectTimer = null;
    /** @type {any} */ this._retryTimer = null;
    /** @type {any} */ this._refreshTimer = null;
    /** @type {any} */ this._hiddenTimer = null;
    /** @type {string | null} */ this._lastToken = null;
    /** @type {{data: Record<string, any>} | null} */ this._closedFrame = null;
    /** @type {{resolve: (data: Record<string, any>) => void, reject: (err: WinkrError) => void} | null} */
    this._connectWaiter = null;
    /** @type {Promise<Record<string, any>> | null} */ this._connectPromise = null;
    this._refCounter = 0;
    /** @type {Map<string, Pending>} */ this._inFlight = new Map();
    /** @type {Pending[]} */ this._queue = []; // waiting for an open connection
    /** @type {Map<string, ConversationSync>} */ this._joined = new Map();
    /** @type {Map<string, {stopTimer: any, repeatTimer: any}>} */ this._typing = new Map();
    /** @type {Map<string, {id: string, username: string, avatar_url: string | null}>} */
    this._people = new Map();
    this._onVisibility = () => this._visibilityChanged();
    if (this.hiddenCloseAfter != null && this._document?.addEventListener) {
      this._document.addEventListener("visibilitychange", this._onVisibility);
    }
  }

  // --- public API --------------------------------------------------------------------

  /** @returns {ClientState} */
  get state() {
    return this._state;
  }

  /** The conversations this client keeps joined (re-joined after every reconnect). */
  get joined() {
    return [...this._joined.keys()];
  }

  /**
   * Connect. Resolves with the data of `connection:established`. If this first attempt
   * fails it rejects (`CONNECTION_ERROR`) and nothing is retried: a browser cannot tell a
   * refused token from a server that is down. Once connected, the client reconnects by
   * itself until `close()`.
   * @returns {Promise<Record<string, any>>}
   */
  connect() {
    if (this._ended) return Promise.reject(new WinkrError("CLOSED", "the client was closed"));
    if (this._connectPromise) return this._connectPromise;
    this._connectPromise = new Promise((resolve, reject) => {
      this._connectWaiter = { resolve, reject };
    });
    this._setState("connecting");
    this._attemptConnection();
    return this._connectPromise;
  }

  /**
   * Listen to a server event by its protocol name (`message:new`, `typing:indicator`, …),
   * `"*"` for every event, or `"state"`. The handler gets `(data, envelope)`; for `"state"`,
   * `(state, {previous, code, reason})`. Returns a function that removes the handler.
   * @param {string} event
   * @param {(data: any, envelope: any) => void} handler
   * @returns {() => void}
   */
  on(event, handler) {
    let set = this._handlers.get(event);
    if (!set) this._handlers.set(event, (set = new Set()));
    set.add(handler);
    return () => this.off(event, handler);
  }

  /**
   * Remove a handler added with `on` (or every handler of the event when none is given).
   * @param {string} event
   * @param {(data: any, envelope: any) => void} [handler]
   */
  off(event, handler) {
    if (handler === undefined) this._handlers.delete(event);
    else this._handlers.get(event)?.delete(handler);
  }

  /**
   * Send any client event and wait for its direct reply (matched by `ref`). Rejects with a
   * `WinkrError`: the server's `error` (code, message, details, envelope), `TIMEOUT` after
   * `timeout` ms counted from the call, `CONNECTION_ERROR` when the connection ends before
   * the reply (read-only requests are sent again instead), `CLOSED` after `close()`.
   * While the client is reconnecting the request waits for the connection.
   * @param {string} event
   * @param {Record<string, any>} [data]
   * @param {{timeout?: number}} [options]
   * @returns {Promise<Envelope>}
   */
  request(event, data = {}, { timeout = this.requestTimeout } = {}) {
    return this._request(event, data, { resend: IDEMPOTENT.has(event), timeout });
  }

  /**
   * Send a message; resolves with the acknowledged (stored) message. While disconnected it
   * waits and is sent after reconnecting; it always carries a `client_message_id` (yours or
   * a generated one), so sending it again after an unknown outcome never duplicates it. It
   * rejects only on a server refusal (`RATE_LIMITED`, `VALIDATION_ERROR`, …), on `close()`,
   * or after `timeout` ms when one is given.
   * @param {string} conversationId
   * @param {string} content
   * @param {{type?: string, metadata?: Record<string, any>, clientMessageId?: string, timeout?: number}} [options]
   * @returns {Promise<Message>}
   */
  async sendMessage(conversationId, content, { type = "text", metadata = {}, clientMessageId, timeout } = {}) {
    this.stopTyping(conversationId);
    const data = {
      conversation_id: conversationId, content, type, metadata,
      client_message_id: clientMessageId ?? newClientMessageId(),
    };
    const envelope = await this._request("message:send", data, {
      resend: true, timeout: timeout ?? null, stallReconnects: true,
    });
    return envelope.data.message;
  }

  /**
   * Join a conversation's room and keep it joined: after every reconnect the client joins
   * again and emits, as `message:new` in `seq` order, every message it missed. Resolves with
   * the `conversation:joined` envelope once this connection is joined and caught up.
   * @param {string} conversationId
   * @returns {Promise<Envelope>}
   */
  join(conversationId) {
    if (this._ended) return Promise.reject(new WinkrError("CLOSED", "the client was closed"));
    let sync = this._joined.get(conversationId);
    if (!sync) {
      sync = { lastSeq: null, syncing: false, buffer: new Map(), generation: -1, waiters: [] };
      this._joined.set(conversationId, sync);
    }
    const joined = new Promise((resolve, reject) => {
      /** @type {ConversationSync} */ (sync).waiters.push({ resolve, reject });
    });
    if (this._isOpen() && !sync.syncing) this._syncConversation(conversationId);
    return /** @type {Promise<Envelope>} */ (joined);
  }

  /**
   * Leave a conversation's room and stop re-joining it.
   * @param {string} conversationId
   * @returns {Promise<Envelope | null>}  the `conversation:left` envelope (null when closed)
   */
  async leave(conversationId) {
    const sync = this._joined.get(conversationId);
    this._joined.delete(conversationId);
    this.stopTyping(conversationId);
    if (sync) {
      for (const waiter of sync.waiters) waiter.reject(new WinkrError("CLOSED", "left the conversation"));
    }
    if (this._ended) return null;
    return this._request("conversation:leave", { conversation_id: conversationId },
      { resend: true, timeout: this.requestTimeout });
  }

  /**
   * Mark every message up to and including `messageId` as read.
   * @param {string} conversationId
   * @param {string} messageId
   * @returns {Promise<Envelope>}  the `message:viewed` envelope
   */
  markRead(conversationId, messageId) {
    return this._request("message:read", { conversation_id: conversationId, message_id: messageId },
      { resend: true, timeout: this.requestTimeout });
  }

  /**
   * Call on every keystroke: sends `typing:start` once per burst (again every
   * `typingRepeat` ms while the burst lasts, so the server's expiry never fires) and
   * `typing:stop` after `typingStopAfter` ms without a call. Does nothing while disconnected.
   * @param {string} conversationId
   */
  typing(conversationId) {
    if (!this._isOpen()) return;
    let burst = this._typing.get(conversationId);
    if (!burst) {
      this._sendFrame({ event: "typing:start", data: { conversation_id: conversationId } });
      burst = { stopTimer: null, repeatTimer: null };
      this._typing.set(conversationId, burst);
      this._repeatTyping(conversationId, burst);
    }
    if (burst.stopTimer) this._timers.clearTimeout(burst.stopTimer);
    burst.stopTimer = this._timers.setTimeout(() => this.stopTyping(conversationId), this.typingStopAfter);
  }

  /**
   * End a typing burst now (sending a message does this too).
   * @param {string} conversationId
   */
  stopTyping(conversationId) {
    const burst = this._typing.get(conversationId);
    if (!burst) return;
    this._typing.delete(conversationId);
    this._timers.clearTimeout(burst.stopTimer);
    this._timers.clearTimeout(burst.repeatTimer);
    if (this._isOpen()) this._sendFrame({ event: "typing:stop", data: { conversation_id: conversationId } });
  }

  /**
   * One page of a conversation's history (docs/protocol.md §3.4); the messages also go to
   * the cache. No cursor: the newest page; `beforeSeq`: the page below it; `afterSeq`: the
   * page above it.
   * @param {string} conversationId
   * @param {HistoryQuery} [query]
   * @returns {Promise<HistoryPage>}
   */
  async history(conversationId, { beforeSeq, afterSeq, limit } = {}) {
    /** @type {Record<string, any>} */
    const data = { conversation_id: conversationId };
    if (beforeSeq != null) data.before_seq = beforeSeq;
    if (afterSeq != null) data.after_seq = afterSeq;
    if (limit != null) data.limit = limit;
    const envelope = await this._request("message:history", data, { resend: true, timeout: this.requestTimeout });
    const { messages, has_more } = envelope.data;
    this._cachePut(conversationId, messages);
    return { messages, has_more };
  }

  /**
   * Close the connection and stop everything: no reconnect, no timers; pending requests
   * reject with `CLOSED`. Idempotent.
   * @returns {Promise<void>}  settles when the socket has closed (or at once)
   */
  close() {
    if (this._ended) return Promise.resolve();
    this._ended = true;
    const ws = this._ws;
    const closed = ws && ws.readyState !== 3
      ? new Promise((resolve) => {
        const timer = this._timers.setTimeout(() => resolve(undefined), 1000); // a dead peer never answers
        if (typeof ws.addEventListener === "function") {
          ws.addEventListener("close", () => {
            this._timers.clearTimeout(timer);
            resolve(undefined);
          });
        }
      })
      : Promise.resolve();
    this._finish(new WinkrError("CLOSED", "the client was closed"), { code: 1000, reason: "client_closed" });
    return /** @type {Promise<void>} */ (closed);
  }

  // --- connecting --------------------------------------------------------------------

  _isOpen() {
    return this._ws !== null && this._established;
  }

  async _attemptConnection() {
    this._retryTimer = null;
    const generation = ++this._generation;
    let token;
    try {
      token = typeof this._token === "function" ? await this._token() : this._token;
      if (typeof token !== "string" || !token) throw new Error("the token function returned no token");
    } catch (err) {
      if (generation !== this._generation || this._ended) return;
      this._connectionLost(generation, { code: 0, reason: `token: ${err}` });
      return;
    }
    if (generation !== this._generation || this._ended || this._suspended) return;
    this._lastToken = token;
    this._closedFrame = null;
    this._established = false;
    let ws;
    try {
      ws = new this._WebSocket(this.url, [SUBPROTOCOL, `bearer.${token}`]);
    } catch (err) {
      this._connectionLost(generation, { code: 0, reason: String(err) });
      return;
    }
    this._ws = ws;
    ws.onmessage = (/** @type {{data: any}} */ event) => {
      if (generation === this._generation) this._receive(event.data);
    };
    ws.onclose = (/** @type {{code: number, reason: string}} */ event) => {
      this._connectionLost(generation, { code: event.code, reason: event.reason });
    };
    ws.onerror = () => {}; // a close event always follows
    this._connectTimer = this._timers.setTimeout(() => {
      if (generation === this._generation && !this._established) {
        this._dropSocket(FORCED_CLOSE_CODE, "connect timeout");
      }
    }, this.connectTimeout);
  }

  /**
   * Give up on the current socket now, without waiting for its close handshake (a dead
   * connection never completes it).
   * @param {number} code @param {string} reason
   */
  _dropSocket(code, reason) {
    const ws = this._ws;
    const generation = this._generation;
    if (ws) {
      try {
        ws.close(code, reason);
      } catch {
        // already closing
      }
    }
    this._connectionLost(generation, { code, reason });
  }

  /** @param {Envelope} envelope */
  _onEstablished(envelope) {
    this._timers.clearTimeout(this._connectTimer);
    this._established = true;
    this._everEstablished = true;
    this._attempt = 0;
    this.userId = envelope.data.user_id ?? null;
    this._setState("open");
    this._emit(envelope);
    if (this._connectWaiter) {
      this._connectWaiter.resolve(envelope.data);
      this._connectWaiter = null;
    }
    this._scheduleRefresh();
    for (const conversationId of this._joined.keys()) this._syncConversation(conversationId);
    const queued = this._queue;
    this._queue = [];
    for (const pending of queued) if (!pending.done) this._send(pending);
  }

  /**
   * The socket of `generation` is gone: settle what was in flight and decide whether to
   * reconnect.
   * @param {number} generation
   * @param {{code: number, reason: string}} how
   */
  _connectionLost(generation, { code, reason }) {
    if (generation !== this._generation || this._ended) return;
    this._generation++; // later events of that socket are ignored
    this._timers.clearTimeout(this._connectTimer);
    this._timers.clearTimeout(this._refreshTimer);
    const wasEstablished = this._established;
    this._ws = null;
    this._established = false;
    this._clearTyping();
    for (const sync of this._joined.values()) {
      sync.syncing = false;
      sync.buffer.clear();
    }
    for (const pending of [...this._inFlight.values()]) {
      this._inFlight.delete(/** @type {string} */ (pending.ref));
      this._timers.clearTimeout(pending.stallTimer);
      if (pending.resend) {
        pending.generation = -1;
        this._queue.push(pending);
      } else {
        this._settle(pending, null, new WinkrError("CONNECTION_ERROR", "the connection closed before the reply"));
      }
    }
    const serverSaid = this._closedFrame?.data;
    const closeCode = serverSaid?.code ?? code;
    const info = { code: closeCode, reason: serverSaid?.reason ?? reason };

    if (!this._everEstablished) {
      // The first connect() failed: reject it and retry nothing; connect() may be called again.
      const err = new WinkrError("CONNECTION_ERROR", `could not connect to ${this.url} (${closeCode || "no answer"})`,
        { code: closeCode, reason: info.reason });
      this._connectPromise = null;
      this._settleAll(err);
      this._setState("closed", info);
      return;
    }
    const refusal = this._permanentRefusal(closeCode, wasEstablished);
    if (refusal) {
      this._finish(new WinkrError("CLOSED", refusal, { code: closeCode, reason: info.reason }), info);
      return;
    }
    this._setState("reconnecting", info);
    if (this._suspended) return; // reconnects when the page is visible again
    this._attempt++;
    const ceiling = Math.min(this.backoffMax, this.backoffInitial * 2 ** (this._attempt - 1));
    const delay = this._random() * ceiling; // full jitter
    this._retryTimer = this._timers.setTimeout(() => this._attemptConnection(), delay);
  }

  /**
   * @param {number} code  the close code (the server's `connection:closed` code first)
   * @param {boolean} wasEstablished
   * @returns {string | null}  why reconnecting is pointless, or null
   */
  _permanentRefusal(code, wasEstablished) {
    if (code === CLOSE_DISCONNECTED) return "disconnected by the server (4004)";
    const hasTokenFunction = typeof this._token === "function";
    if (code === CLOSE_TOKEN_EXPIRED && !hasTokenFunction) return "the token expired and there is no token function";
    if (!hasTokenFunction && !wasEstablished && this._lastToken) {
      const exp = tokenExpiry(this._lastToken);
      if (exp !== null && exp <= this._timers.now()) return "the token expired and there is no token function";
    }
    return null;
  }

  /**
   * The end: state `closed`, everything pending rejected, no timers left.
   * @param {WinkrError} err @param {{code: number, reason: string}} info
   */
  _finish(err, info) {
    this._ended = true;
    this._generation++;
    for (const timer of [this._connectTimer, this._retryTimer, this._refreshTimer, this._hiddenTimer]) {
      this._timers.clearTimeout(timer);
    }
    this._clearTyping();
    const ws = this._ws;
    this._ws = null;
    this._established = false;
    if (ws) {
      try {
        ws.close(1000, "client closed");
      } catch {
        // already closing
      }
    }
    if (this._document?.removeEventListener) this._document.removeEventListener("visibilitychange", this._onVisibility);
    this._settleAll(err);
    this._setState("closed", info);
  }

  /** Reject everything that waits: requests, sends, joins, connect(). @param {WinkrError} err */
  _settleAll(err) {
    const pending = [...this._inFlight.values(), ...this._queue];
    this._inFlight.clear();
    this._queue = [];
    for (const p of pending) this._settle(p, null, err);
    for (const sync of this._joined.values()) {
      for (const waiter of sync.waiters) waiter.reject(err);
      sync.waiters = [];
    }
    if (this._connectWaiter) {
      this._connectWaiter.reject(err);
      this._connectWaiter = null;
    }
  }

  // --- receiving ---------------------------------------------------------------------

  /** @param {any} raw */
  _receive(raw) {
    /** @type {Envelope} */
    let envelope;
    try {
      envelope = JSON.parse(typeof raw === "string" ? raw : String(raw));
    } catch {
      return;
    }
    if (!envelope || typeof envelope.event !== "string") return;
    envelope.data = envelope.data ?? {};
    if (envelope.event === "connection:established") {
      this._onEstablished(envelope);
      return;
    }
    if (envelope.event === "connection:closed") this._closedFrame = envelope;
    this._learnPeople(envelope);
    const pending = envelope.ref !== undefined ? this._inFlight.get(envelope.ref) : undefined;
    if (pending) {
      this._inFlight.delete(/** @type {string} */ (envelope.ref));
      if (envelope.event === "error") {
        const d = envelope.data;
        this._settle(pending, null, new WinkrError(d.code, d.message, d.details ?? {}, envelope));
      } else {
        this._settle(pending, envelope, null);
      }
      if (pending.silent) return;
    }
    if (envelope.event === "message:new") {
      this._sequence(envelope);
      return;
    }
    if (envelope.event === "conversation:closed") {
      // Unmatched or blocked: the conversation is gone for good, so stop re-joining it.
      const sync = this._joined.get(envelope.data.conversation_id);
      this._joined.delete(envelope.data.conversation_id);
      this.stopTyping(envelope.data.conversation_id);
      for (const waiter of sync?.waiters ?? []) waiter.reject(new WinkrError("NOT_FOUND", "the conversation was closed"));
    }
    if (envelope.event === "message:deleted") {
      const d = envelope.data;
      this._cacheUpdate(d.conversation_id, d.message_id, {
        is_deleted: true, content: "", metadata: {}, updated_at: d.deleted_at,
      });
    }
    this._emit(envelope);
  }

  /** @param {Envelope} envelope */
  _learnPeople(envelope) {
    const d = envelope.data;
    if (envelope.event === "message:new" && d.sender?.id) this._people.set(d.sender.id, d.sender);
    if (envelope.event === "conversation:list") {
      for (const c of d.conversations ?? []) {
        for (const p of c.participants ?? []) {
          this._people.set(p.id, { id: p.id, username: p.username, avatar_url: p.avatar_url ?? null });
        }
      }
    }
  }

  // --- exactly once, in order --------------------------------------------------------

  /**
   * Emit `message:new` for a joined conversation only in `seq` order and only once; a gap
   * starts a catch-up from history. Other conversations' messages pass straight through.
   * @param {Envelope} envelope
   */
  _sequence(envelope) {
    const message = envelope.data.message;
    const sync = message && this._joined.get(message.conversation_id);
    if (!sync) {
      if (message) this._cachePut(message.conversation_id, [message]);
      this._emit(envelope);
      return;
    }
    const seq = message.seq;
    if (sync.lastSeq !== null && seq <= sync.lastSeq) return; // seen already
    if (sync.syncing || sync.lastSeq === null) {
      sync.buffer.set(seq, envelope);
      return;
    }
    if (seq === sync.lastSeq + 1) {
      this._deliver(sync, envelope);
      this._drain(sync);
      return;
    }
    sync.buffer.set(seq, envelope); // a gap: fetch what is missing
    this._catchUp(message.conversation_id, this._generation);
  }

  /** @param {ConversationSync} sync @param {Envelope} envelope */
  _deliver(sync, envelope) {
    const message = envelope.data.message;
    sync.lastSeq = message.seq;
    this._cachePut(message.conversation_id, [message]);
    this._emit(envelope);
  }

  /** Emit the buffered messages that follow `lastSeq` without a gap. @param {ConversationSync} sync */
  _drain(sync) {
    for (const seq of [...sync.buffer.keys()].sort((a, b) => a - b)) {
      const envelope = /** @type {Envelope} */ (sync.buffer.get(seq));
      if (sync.lastSeq !== null && seq <= sync.lastSeq) sync.buffer.delete(seq);
      else if (sync.lastSeq !== null && seq === sync.lastSeq + 1) {
        sync.buffer.delete(seq);
        this._deliver(sync, envelope);
      } else break;
    }
  }

  /**
   * Join (on this connection) and catch up one conversation.
   * @param {string} conversationId
   */
  async _syncConversation(conversationId) {
    const sync = this._joined.get(conversationId);
    if (!sync || sync.syncing) return;
    const generation = this._generation;
    sync.syncing = true;
    let joined;
    try {
      joined = await this._request("conversation:join", { conversation_id: conversationId },
        { resend: false, timeout: this.requestTimeout, stallReconnects: true });
      if (sync.lastSeq === null) {
        const cached = await this._cacheLastSeq(conversationId);
        if (cached !== null && sync.lastSeq === null) sync.lastSeq = cached;
      }
      if (sync.lastSeq === null) {
        // Nothing known: start from the newest message (the app pages older ones itself).
        const page = await this._request("message:history", { conversation_id: conversationId, limit: 1 },
          { resend: false, silent: true, timeout: this.requestTimeout, stallReconnects: true });
        const newest = page.data.messages.at(-1);
        this._cachePut(conversationId, page.data.messages);
        if (sync.lastSeq === null) sync.lastSeq = newest ? newest.seq : 0;
      }
    } catch (err) {
      if (generation !== this._generation || this._joined.get(conversationId) !== sync) return;
      sync.syncing = false;
      const error = /** @type {WinkrError} */ (err);
      if (error.envelope) { // refused (the conversation is gone or closed): stop re-joining it
        this._joined.delete(conversationId);
        for (const waiter of sync.waiters) waiter.reject(error);
        sync.waiters = [];
      }
      return;
    }
    sync.syncing = false;
    sync.generation = generation;
    await this._catchUp(conversationId, generation);
    if (generation !== this._generation || this._joined.get(conversationId) !== sync) return;
    for (const waiter of sync.waiters) waiter.resolve(joined);
    sync.waiters = [];
  }

  /**
   * Fetch every message after `lastSeq` and emit each once, in order; then the buffered
   * live ones. Runs until no gap is left (bounded, in case a message never shows up).
   * @param {string} conversationId
   * @param {number} generation
   */
  async _catchUp(conversationId, generation) {
    const sync = this._joined.get(conversationId);
    if (!sync || sync.syncing || sync.lastSeq === null) return;
    sync.syncing = true;
    try {
      for (let round = 0; round < MAX_CATCH_UP_ROUNDS; round++) {
        const page = await this._request("message:history", {
          conversation_id: conversationId, after_seq: sync.lastSeq, limit: CATCH_UP_PAGE,
        }, { resend: false, silent: true, timeout: this.requestTimeout, stallReconnects: true });
        if (generation !== this._generation || this._joined.get(conversationId) !== sync) return;
        for (const message of page.data.messages) {
          if (message.seq <= sync.lastSeq) continue;
          const live = sync.buffer.get(message.seq);
          sync.buffer.delete(message.seq);
          this._deliver(sync, live ?? this._replayed(message));
        }
        this._drain(sync);
        if (page.data.has_more) {
          round = -1; // progress: keep paging
          continue;
        }
        if (sync.buffer.size === 0) break;
      }
    } catch {
      if (generation !== this._generation) return; // the reconnect catches up again
    } finally {
      if (this._joined.get(conversationId) === sync && generation === this._generation) {
        sync.syncing = false;
        if (sync.buffer.size) { // give up on a gap that never fills: order over completeness
          for (const seq of [...sync.buffer.keys()].sort((a, b) => a - b)) {
            const envelope = /** @type {Envelope} */ (sync.buffer.get(seq));
            if (sync.lastSeq === null || seq > sync.lastSeq) this._deliver(sync, envelope);
          }
          sync.buffer.clear();
        }
      }
    }
  }

  /** A `message:new` envelope for a message that came from history. @param {Message} message */
  _replayed(message) {
    const person = this._people.get(message.sender_id);
    return {
      event: "message:new",
      data: { message, sender: person ?? { id: message.sender_id, username: message.sender_id, avatar_url: null } },
      timestamp: message.created_at,
      replayed: true,
    };
  }

  // --- sending -----------------------------------------------------------------------

  /**
   * @param {string} event
   * @param {Record<string, any>} data
   * @param {{resend: boolean, timeout: number | null, silent?: boolean, stallReconnects?: boolean}} how
   * @returns {Promise<Envelope>}
   */
  _request(event, data, { resend, timeout, silent = false, stallReconnects = false }) {
    if (this._ended) return Promise.reject(new WinkrError("CLOSED", "the client was closed"));
    if (!this._connectPromise) {
      return Promise.reject(new WinkrError("CONNECTION_ERROR", "not connected: call connect() first"));
    }
    const size = utf8Length(JSON.stringify({ event, data, ref: "w0000000000" }));
    if (this.maxFrameBytes && size > this.maxFrameBytes) {
      return Promise.reject(new WinkrError("MESSAGE_TOO_LARGE",
        `the frame would be ${size} bytes; the server accepts ${this.maxFrameBytes}`));
    }
    return new Promise((resolve, reject) => {
      /** @type {Pending} */
      const pending = {
        event, data, ref: null, generation: -1, resolve, reject, resend, silent, stallReconnects,
        timer: null, stallTimer: null, done: false,
      };
      if (timeout != null) {
        pending.timer = this._timers.setTimeout(() => {
          if (pending.ref) this._inFlight.delete(pending.ref);
          this._settle(pending, null, new WinkrError("TIMEOUT", `no reply to ${event} within ${timeout} ms`));
        }, timeout);
      }
      if (this._isOpen()) this._send(pending);
      else this._queue.push(pending);
    });
  }

  /** @param {Pending} pending */
  _send(pending) {
    pending.ref = `w${++this._refCounter}`;
    pending.generation = this._generation;
    this._inFlight.set(pending.ref, pending);
    this._sendFrame({ event: pending.event, data: pending.data, ref: pending.ref });
    if (pending.stallReconnects) {
      const generation = this._generation;
      pending.stallTimer = this._timers.setTimeout(() => {
        // An open connection that answers nothing for this long is dead: start over.
        if (!pending.done && generation === this._generation && this._ws) {
          this._dropSocket(FORCED_CLOSE_CODE, "no reply");
        }
      }, this.requestTimeout);
    }
  }

  /** @param {Record<string, any>} frame */
  _sendFrame(frame) {
    try {
      this._ws.send(JSON.stringify(frame));
    } catch {
      // the socket is closing; its close event settles what was in flight
    }
  }

  /**
   * @param {Pending} pending
   * @param {Envelope | null} envelope
   * @param {WinkrError | null} error
   */
  _settle(pending, envelope, error) {
    if (pending.done) return;
    pending.done = true;
    this._timers.clearTimeout(pending.timer);
    this._timers.clearTimeout(pending.stallTimer);
    if (error) pending.reject(error);
    else pending.resolve(/** @type {Envelope} */ (envelope));
  }

  // --- typing, refresh, visibility ---------------------------------------------------

  /** @param {string} conversationId @param {{stopTimer: any, repeatTimer: any}} burst */
  _repeatTyping(conversationId, burst) {
    burst.repeatTimer = this._timers.setTimeout(() => {
      if (this._typing.get(conversationId) !== burst || !this._isOpen()) return;
      this._sendFrame({ event: "typing:start", data: { conversation_id: conversationId } });
      this._repeatTyping(conversationId, burst);
    }, this.typingRepeat);
  }

  _clearTyping() {
    for (const burst of this._typing.values()) {
      this._timers.clearTimeout(burst.stopTimer);
      this._timers.clearTimeout(burst.repeatTimer);
    }
    this._typing.clear(); // the server ends typing of a closed connection by itself
  }

  _scheduleRefresh() {
    this._timers.clearTimeout(this._refreshTimer);
    if (typeof this._token !== "function" || !this._lastToken) return;
    const exp = tokenExpiry(this._lastToken);
    if (exp === null) return;
    const left = exp - this._timers.now();
    const delay = Math.max(0, left - Math.min(this.refreshMargin, left / 2));
    const generation = this._generation;
    this._refreshTimer = this._timers.setTimeout(() => this._refresh(generation), delay);
  }

  /** @param {number} generation */
  async _refresh(generation) {
    if (generation !== this._generation || typeof this._token !== "function") return;
    try {
      const token = await this._token();
      if (generation !== this._generation) return;
      await this._request("auth:refresh", { token }, { resend: false, timeout: this.requestTimeout });
      if (generation !== this._generation) return;
      this._lastToken = token;
      this._scheduleRefresh();
    } catch {
      // The server closes with 4001 at exp; the reconnect then asks for a fresh token.
    }
  }

  _visibilityChanged() {
    if (this._ended || this.hiddenCloseAfter == null || !this._document) return;
    this._timers.clearTimeout(this._hiddenTimer);
    if (this._document.visibilityState === "hidden") {
      this._hiddenTimer = this._timers.setTimeout(() => {
        if (this._ended || !this._everEstablished) return;
        this._suspended = true;
        this._timers.clearTimeout(this._retryTimer);
        if (this._ws) this._dropSocket(1000, "page hidden");
        else this._generation++; // an attempt in progress is abandoned
      }, this.hiddenCloseAfter);
    } else if (this._suspended) {
      this._suspended = false;
      this._attempt = 0;
      this._attemptConnection();
    }
  }

  // --- events and cache --------------------------------------------------------------

  /** @param {ClientState} state @param {{code?: number, reason?: string}} [info] */
  _setState(state, info = {}) {
    const previous = this._state;
    if (previous === state) return;
    this._state = state;
    this._call("state", state, { previous, ...info });
  }

  /** @param {Envelope} envelope */
  _emit(envelope) {
    this._call(envelope.event, envelope.data, envelope);
    this._call("*", envelope.data, envelope);
  }

  /** @param {string} event @param {any} data @param {any} envelope */
  _call(event, data, envelope) {
    const handlers = this._handlers.get(event);
    if (!handlers) return;
    for (const handler of [...handlers]) {
      try {
        handler(data, envelope);
      } catch (err) {
        // A broken handler must not break the client; report it where the app sees it.
        const report = /** @type {any} */ (globalThis).reportError;
        if (typeof report === "function") report(err);
        else console.error(err);
      }
    }
  }

  /** @param {string} conversationId @param {Message[]} messages */
  _cachePut(conversationId, messages) {
    if (!messages || !messages.length) return;
    try {
      Promise.resolve(this.cache.put(conversationId, messages)).catch(() => {});
    } catch {
      // a cache failure never breaks the chat
    }
  }

  /** @param {string} conversationId @param {string} messageId @param {Partial<Message>} patch */
  _cacheUpdate(conversationId, messageId, patch) {
    try {
      Promise.resolve(this.cache.update(conversationId, messageId, patch)).catch(() => {});
    } catch {
      // a cache failure never breaks the chat
    }
  }

  /** @param {string} conversationId @returns {Promise<number | null>} */
  async _cacheLastSeq(conversationId) {
    try {
      const seq = await this.cache.lastSeq(conversationId);
      return typeof seq === "number" ? seq : null;
    } catch {
      return null;
    }
  }
}
