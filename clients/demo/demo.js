// The Winkr browser demo: a small chat on winkr-client.js (no build step). One tab per user.
import { WinkrClient } from "/winkr-client.js";

const USERS = ["alice", "bob", "carol"];
const me = new URLSearchParams(location.search).get("user");
const $ = (/** @type {string} */ id) => /** @type {HTMLElement} */ (document.getElementById(id));

const state = {
  /** @type {Map<string, {conversationId: string, online: boolean, unread: number}>} peer → its chat */
  peers: new Map(),
  /** @type {Map<string, string>} conversation id → peer */
  peerOf: new Map(),
  /** @type {string | null} */
  open: null,
  /** @type {Map<string, any>} message id → message (the open conversation) */
  messages: new Map(),
};
// For the end-to-end tests: how many times message:new fired for each message id.
const demo = {
  client: /** @type {WinkrClient | null} */ (null),
  state,
  newMessageCount: /** @type {Record<string, number>} */ ({}),
  stateLog: /** @type {[string, number][]} */ ([]), // [state, Date.now()]
  lastRender: 0, // Date.now() of the last message added or updated
};
/** @type {any} */ (window).demo = demo;

if (!me || !USERS.includes(me)) {
  $("pick").hidden = false;
} else {
  start().catch((err) => showError(`could not start: ${err.message ?? err}`));
}

async function start() {
  $("me").textContent = me;
  const config = await (await fetch("/config.json")).json();
  const client = new WinkrClient({ url: config.ws_url, token: await tokenSource(config), hiddenCloseAfter: 5 * 60_000 });
  demo.client = client;
  wire(client);
  await client.connect();
  document.querySelector("main").hidden = false;
  for (const peer of USERS.filter((u) => u !== me)) {
    const reply = await client.request("conversation:create", { participant_ids: [peer] });
    const conversationId = reply.data.conversation.id;
    state.peers.set(peer, { conversationId, online: false, unread: 0 });
    state.peerOf.set(conversationId, peer);
  }
  await refreshList();
  renderContacts();
  await openChat(USERS.find((u) => u !== me));
}

/** A token function when the demo server mints tokens, else the token pasted in the page. */
async function tokenSource(config) {
  if (config.mint) {
    return async () => {
      const response = await fetch(`/token?user=${encodeURIComponent(me)}`);
      if (!response.ok) throw new Error(`token: HTTP ${response.status}`);
      return (await response.json()).token;
    };
  }
  $("signin").hidden = false;
  $("signin-user").textContent = me;
  return new Promise((resolve) => {
    $("use-token").addEventListener("click", () => {
      $("signin").hidden = true;
      resolve(/** @type {HTMLTextAreaElement} */ ($("token")).value.trim());
    });
  });
}

/** @param {WinkrClient} client */
function wire(client) {
  client.on("state", (s) => {
    demo.stateLog.push([s, Date.now()]);
    $("status").textContent = s;
    $("status").dataset.state = s;
  });
  client.on("connection:established", () => {
    if (state.peers.size) refreshList().then(renderContacts); // presence and unread may have changed
  });
  client.on("message:new", ({ message }) => {
    demo.newMessageCount[message.id] = (demo.newMessageCount[message.id] ?? 0) + 1;
    if (state.peerOf.get(message.conversation_id) !== state.open) return;
    upsert(message);
    if (message.sender_id !== me) readUpTo(message);
  });
  client.on("conversation:unread", ({ conversation_id, unread_count }) => {
    const peer = state.peerOf.get(conversation_id);
    if (!peer || peer === state.open) return;
    /** @type {any} */ (state.peers.get(peer)).unread = unread_count;
    renderContacts();
  });
  client.on("message:delivered", ({ message_id }) => setTick(message_id, "delivered"));
  client.on("message:viewed", ({ message_id, reader_id }) => {
    if (reader_id === me) return;
    const upTo = state.messages.get(message_id)?.seq ?? Infinity;
    for (const m of state.messages.values()) if (m.sender_id === me && m.seq <= upTo) setTick(m.id, "read");
  });
  client.on("message:deleted", ({ message_id }) => {
    const m = state.messages.get(message_id);
    if (m) upsert({ ...m, is_deleted: true, content: "" });
  });
  client.on("typing:indicator", ({ conversation_id, user_id, username, is_typing }) => {
    if (user_id === me || state.peerOf.get(conversation_id) !== state.open) return;
    $("typing").textContent = is_typing ? `${username} is typing…` : "";
  });
  client.on("user:online", ({ user_id }) => setOnline(user_id, true));
  client.on("user:offline", ({ user_id }) => setOnline(user_id, false));
  client.on("error", (data, envelope) => {
    if (!envelope.ref) showError(`${data.code}: ${data.message}`); // replies to requests are shown where they are made
  });

  $("text").addEventListener("input", () => {
    if (state.open) client.typing(/** @type {any} */ (state.peers.get(state.open)).conversationId);
  });
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = /** @type {HTMLInputElement} */ ($("text"));
    const text = input.value.trim();
    if (!text || !state.open) return;
    input.value = "";
    send(client, /** @type {any} */ (state.peers.get(state.open)).conversationId, text);
  });
  document.addEventListener("visibilitychange", () => {
    const last = [...state.messages.values()].filter((m) => m.sender_id !== me).at(-1);
    if (last) readUpTo(last);
  });
}

async function refreshList() {
  const reply = await /** @type {WinkrClient} */ (demo.client).request("conversation:list");
  for (const conversation of reply.data.conversations) {
    const peer = state.peerOf.get(conversation.id);
    if (!peer) continue;
    const chat = /** @type {any} */ (state.peers.get(peer));
    chat.online = conversation.participants.some((/** @type {any} */ p) => p.id === peer && p.online);
    if (peer !== state.open) chat.unread = conversation.unread_count;
  }
}

/** @param {string | undefined} peer */
async function openChat(peer) {
  if (!peer || peer === state.open) return;
  const client = /** @type {WinkrClient} */ (demo.client);
  const previous = state.open && state.peers.get(state.open);
  if (previous) client.leave(previous.conversationId).catch(() => {});
  state.open = peer;
  state.messages.clear();
  $("messages").replaceChildren();
  $("typing").textContent = "";
  $("peer").textContent = peer;
  const chat = /** @type {any} */ (state.peers.get(peer));
  chat.unread = 0;
  renderContacts();
  for (const el of [$("text"), $("send")]) /** @type {HTMLInputElement} */ (el).disabled = false;
  await client.join(chat.conversationId);
  const page = await client.history(chat.conversationId, { limit: 50 });
  if (state.open !== peer) return;
  for (const message of page.messages) upsert(message);
  const last = page.messages.filter((m) => m.sender_id !== me).at(-1);
  if (last) readUpTo(last);
}

/** @param {WinkrClient} client @param {string} conversationId @param {string} text */
function send(client, conversationId, text) {
  const clientMessageId = crypto.randomUUID();
  const li = bubble({ id: "", seq: Infinity, sender_id: me, content: text, is_deleted: false }, "pending");
  li.dataset.cmid = clientMessageId;
  $("messages").append(li);
  li.scrollIntoView();
  client.sendMessage(conversationId, text, { clientMessageId })
    .then((message) => { if (state.peerOf.get(message.conversation_id) === state.open) upsert(message); })
    .catch((err) => {
      li.classList.add("failed");
      showError(`not sent: ${err.code}: ${err.message}`);
    });
}

/** Add or update a message in the open conversation, in seq order, once. */
function upsert(/** @type {any} */ message) {
  demo.lastRender = Date.now();
  const known = state.messages.get(message.id);
  state.messages.set(message.id, { ...known, ...message });
  let li = /** @type {HTMLElement | null} */ (document.querySelector(`#messages li[data-id="${CSS.escape(message.id)}"]`));
  if (!li && message.client_message_id) {
    li = document.querySelector(`#messages li[data-cmid="${CSS.escape(message.client_message_id)}"]`);
  }
  const tick = li?.querySelector(".tick")?.getAttribute("data-tick");
  const next = bubble(message, message.sender_id !== me ? "" : tick === "delivered" || tick === "read"
    ? tick : message.is_read ? "read" : "sent");
  if (li) li.replaceWith(next);
  const after = [...$("messages").children].find((el) => Number(/** @type {HTMLElement} */ (el).dataset.seq) > message.seq
    || /** @type {HTMLElement} */ (el).dataset.seq === "pending");
  if (after !== next) $("messages").insertBefore(next, after ?? null);
  next.scrollIntoView();
}

/** @param {any} message @param {string} tick */
function bubble(message, tick) {
  const li = document.createElement("li");
  li.className = `msg ${message.sender_id === me ? "mine" : "theirs"}${message.is_deleted ? " deleted" : ""}`;
  li.dataset.id = message.id;
  li.dataset.seq = Number.isFinite(message.seq) ? String(message.seq) : "pending";
  if (message.client_message_id) li.dataset.cmid = message.client_message_id;
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = message.is_deleted ? "message deleted" : message.content;
  li.append(text);
  if (tick) {
    const t = document.createElement("span");
    t.className = "tick";
    t.dataset.tick = tick;
    li.append(t);
  }
  return li;
}

/** @param {string} messageId @param {"delivered" | "read"} tick */
function setTick(messageId, tick) {
  const el = document.querySelector(`#messages li[data-id="${CSS.escape(messageId)}"] .tick`);
  if (!el || el.getAttribute("data-tick") === "read") return;
  el.setAttribute("data-tick", tick);
}

function readUpTo(/** @type {any} */ message) {
  if (document.visibilityState !== "visible") return;
  const client = /** @type {WinkrClient} */ (demo.client);
  client.markRead(message.conversation_id, message.id).catch(() => {});
}

/** @param {string} userId @param {boolean} online */
function setOnline(userId, online) {
  const chat = state.peers.get(userId);
  if (!chat) return;
  chat.online = online;
  renderContacts();
}

function renderContacts() {
  $("contacts").replaceChildren(...[...state.peers].map(([peer, chat]) => {
    const li = document.createElement("li");
    li.dataset.user = peer;
    if (peer === state.open) li.className = "active";
    const dot = document.createElement("span");
    dot.className = "dot";
    dot.dataset.online = String(chat.online);
    const name = document.createElement("span");
    name.textContent = peer;
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = chat.unread ? String(chat.unread) : "";
    li.append(dot, name, badge);
    li.addEventListener("click", () => openChat(peer));
    return li;
  }));
}

/** @param {string} text */
function showError(text) {
  $("error").textContent = text;
}
