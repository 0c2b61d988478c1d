// Types for winkr-client.js (contract §15). The JavaScript source is `// @ts-check`-clean
// as well; test/types.test.js checks that every member declared here exists at run time.

export declare const VERSION: string;

export type ClientState = "connecting" | "open" | "reconnecting" | "closed";

/** A message as the server stores it (docs/protocol.md §5). */
export interface Message {
  /** opaque: `"<conversation_id>.<seq>"` */
  id: string;
  conversation_id: string;
  /** 1, 2, 3, … per conversation, no gaps */
  seq: number;
  sender_id: string;
  type: "text" | "photo" | "photo_ephemeral" | "location" | "gift" | "system" | string;
  content: string;
  metadata: Record<string, any>;
  created_at: string;
  updated_at: string;
  is_read: boolean;
  is_deleted: boolean;
  client_message_id?: string;
}

export interface Sender {
  id: string;
  username: string;
  avatar_url: string | null;
}

/** A server → client frame. */
export interface Envelope<D = Record<string, any>> {
  event: string;
  data: D;
  timestamp?: string;
  /** present on the direct reply to a request */
  ref?: string;
  /** set by the client on a `message:new` rebuilt from history during a catch-up */
  replayed?: boolean;
}

export interface HistoryQuery {
  beforeSeq?: number;
  afterSeq?: number;
  /** 1–100 (server default 50) */
  limit?: number;
}

export interface HistoryPage {
  /** ascending `seq` */
  messages: Message[];
  has_more: boolean;
}

/** Where the client keeps recent messages; every method may be async (IndexedDB). */
export interface MessageCache {
  /** insert or replace by `seq` */
  put(conversationId: string, messages: Message[]): void | Promise<void>;
  /** like `history`: the newest `limit` in the range (the oldest above `afterSeq` alone), ascending */
  get(conversationId: string, query?: HistoryQuery): Message[] | Promise<Message[]>;
  /** the highest `seq` held, or null */
  lastSeq(conversationId: string): number | null | Promise<number | null>;
  update(conversationId: string, messageId: string, patch: Partial<Message>): void | Promise<void>;
  clear(conversationId?: string): void | Promise<void>;
}

export declare class MemoryCache implements MessageCache {
  constructor(options?: { maxMessages?: number; maxConversations?: number });
  readonly maxMessages: number;
  readonly maxConversations: number;
  put(conversationId: string, messages: Message[]): void;
  get(conversationId: string, query?: HistoryQuery): Message[];
  lastSeq(conversationId: string): number | null;
  update(conversationId: string, messageId: string, patch: Partial<Message>): void;
  clear(conversationId?: string): void;
}

export interface Timers {
  setTimeout(fn: () => void, ms: number): any;
  clearTimeout(handle: any): void;
  /** milliseconds */
  now(): number;
}

export type TokenSource = string | (() => string | Promise<string>);

export interface ClientOptions {
  /** `wss://host/ws` */
  url: string;
  /** a JWT, or a function returning one (called before every attempt and for `auth:refresh`) */
  token: TokenSource;
  /** a WebSocket constructor (default `globalThis.WebSocket`) */
  WebSocket?: any;
  /** ms before `request()` rejects with `TIMEOUT` (10000) */
  requestTimeout?: number;
  /** ms for one connection attempt (10000) */
  connectTimeout?: number;
  /** ms: the first retry waits up to this (1000) */
  backoffInitial?: number;
  /** ms: the backoff's cap (30000) */
  backoffMax?: number;
  /** ms without a keystroke before `typing:stop` (3000) */
  typingStopAfter?: number;
  /** ms between repeated `typing:start` during a long burst (4000) */
  typingRepeat?: number;
  /** ms before `exp` to send `auth:refresh` (60000, at most half the token's remaining life) */
  refreshMargin?: number;
  /** frames over this many bytes are refused before sending (32768) */
  maxFrameBytes?: number;
  /** close after the page has been hidden this many ms, reconnect when visible; null = never */
  hiddenCloseAfter?: number | null;
  /** default: `new MemoryCache()` (200 messages × 100 conversations) */
  cache?: MessageCache;
  timers?: Timers;
  /** default `Math.random` (the backoff's jitter) */
  random?: () => number;
  /** default `globalThis.document` (visibility) */
  document?: any;
}

/** What requests reject with: the server's `error`, or a client code. */
export declare class WinkrError extends Error {
  constructor(code: string, message: string, details?: Record<string, any>, envelope?: Envelope | null);
  /** a protocol code (`RATE_LIMITED`, …) or `TIMEOUT`, `CONNECTION_ERROR`, `CLOSED`, `MESSAGE_TOO_LARGE` */
  code: string;
  details: Record<string, any>;
  /** the server's `error` envelope, when there is one */
  envelope: Envelope | null;
}

export interface StateInfo {
  previous: ClientState;
  /** the close code, when a connection ended */
  code?: number;
  reason?: string;
}

export declare class WinkrClient {
  constructor(options: ClientOptions);
  readonly url: string;
  readonly state: ClientState;
  /** conversations kept joined (re-joined after every reconnect) */
  readonly joined: string[];
  /** the user id from the last `connection:established` */
  userId: string | null;
  cache: MessageCache;

  /** Resolves with the data of `connection:established`; a failed first attempt rejects and is not retried. */
  connect(): Promise<Record<string, any>>;
  on(event: "state", handler: (state: ClientState, info: StateInfo) => void): () => void;
  on(event: "message:new", handler: (data: { message: Message; sender: Sender }, envelope: Envelope) => void): () => void;
  on(event: string, handler: (data: any, envelope: Envelope) => void): () => void;
  off(event: string, handler?: (...args: any[]) => void): void;
  /** Any client event; the direct reply, or a `WinkrError`. */
  request(event: string, data?: Record<string, any>, options?: { timeout?: number }): Promise<Envelope>;
  /** Resolves with the stored message; queued while disconnected; never duplicated. */
  sendMessage(conversationId: string, content: string, options?: {
    type?: string; metadata?: Record<string, any>; clientMessageId?: string; timeout?: number;
  }): Promise<Message>;
  /** Join and keep joined; resolves with `conversation:joined` once caught up. */
  join(conversationId: string): Promise<Envelope>;
  leave(conversationId: string): Promise<Envelope | null>;
  /** Resolves with the `message:viewed` reply. */
  markRead(conversationId: string, messageId: string): Promise<Envelope>;
  /** Call on every keystroke. */
  typing(conversationId: string): void;
  stopTyping(conversationId: string): void;
  history(conversationId: string, query?: HistoryQuery): Promise<HistoryPage>;
  /** Stops everything; settles when the socket has closed. */
  close(): Promise<void>;
}

/** The `exp` claim of a JWT in ms (not verified; used to plan `auth:refresh`). */
export declare function tokenExpiry(token: string): number | null;
