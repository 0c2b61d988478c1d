// Unit tests of winkr-client.js on a fake WebSocket and a fake clock: `node --test test/`.
import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { MemoryCache, WinkrClient, WinkrError, tokenExpiry } from "../winkr-client.js";
import { FakeClock, FakeServer, fakeJwt, flush, msg, newMessage } from "./fakes.js";

const C = "conv-1";

/** A client on a fake server and clock. @param {Record<string, any>} [options] */
function setup(options = {}) {
  const clock = new FakeClock();
  const server = new FakeServer();
  const client = new WinkrClient({
    url: "ws://test/ws", token: "tok", WebSocket: server.WebSocket, timers: clock, random: () => 1,
    ...options,
  });
  /** @type {any[]} */
  const states = [];
  client.on("state", (state) => states.push(state));
  /** @type {any[]} */
  const messages = [];
  client.on("message:new", (data, envelope) => messages.push({ seq: data.message.seq, replayed: !!envelope.replayed }));
  return { clock, server, client, states, messages };
}

/** Connect and accept. */
async function connected(options = {}) {
  const t = setup(options);
  const connecting = t.client.connect();
  await flush();
  t.server.last.accept();
  await connecting;
  return t;
}

/** Answer the join + seed of a freshly joined conversation (server newest seq = `newest`). */
async function answerJoin(/** @type {any} */ ws, conversationId = C, newest = 0) {
  await flush();
  ws.reply(ws.one("conversation:join"), "conversation:joined", { conversation_id: conversationId });
  await flush();
  const seed = ws.take("message:history");
  if (seed.length) {
    assert.equal(seed[0].data.limit, 1);
    ws.reply(seed[0], "message:history", {
      conversation_id: conversationId, messages: newest ? [msg(conversationId, newest)] : [], has_more: newest > 1,
    });
    await flush();
  }
  const catchUp = ws.one("message:history");
  assert.equal(catchUp.data.after_seq, newest);
  ws.reply(catchUp, "message:history", { conversation_id: conversationId, messages: [], has_more: false });
  await flush();
}

describe("connecting", () => {
  it("resolves at connection:established, offers winkr.v1 and the bearer subprotocol", async () => {
    const { client, server, states } = setup();
    const connecting = client.connect();
    assert.equal(client.state, "connecting");
    await flush();
    assert.deepEqual(server.last.protocols, ["winkr.v1", "bearer.tok"]);
    server.last.accept("alice");
    const established = await connecting;
    assert.equal(established.user_id, "alice");
    assert.equal(client.state, "open");
    assert.deepEqual(states, ["connecting", "open"]);
  });

  it("a first connect that fails with a static token rejects and never retries", async () => {
    const { client, server, clock, states } = setup();
    const connecting = client.connect();
    await flush();
    server.last.refuse();
    await assert.rejects(connecting, (err) => err instanceof WinkrError && err.code === "CONNECTION_ERROR");
    await clock.advance(10 * 60_000);
    assert.equal(server.sockets.length, 1);
    assert.equal(client.state, "closed");
    assert.deepEqual(states, ["connecting", "closed"]);
    assert.equal(clock.timers.size, 0);
    // The app may try again itself.
    const again = client.connect();
    await flush();
    assert.equal(server.sockets.length, 2);
    server.last.accept();
    await again;
    assert.equal(client.state, "open");
  });

  it("a first attempt that never answers times out and rejects", async () => {
    const { client, server, clock } = setup({ connectTimeout: 5000 });
    const connecting = client.connect();
    const outcome = connecting.catch((err) => err);
    await clock.advance(5000);
    assert.equal((await outcome).code, "CONNECTION_ERROR");
    assert.equal(server.last.closedWith?.code, 4000);
  });

  it("requests before connect() reject; requests while connecting wait for the connection", async () => {
    const { client, server } = setup();
    await assert.rejects(client.request("conversation:list"), { code: "CONNECTION_ERROR" });
    const connecting = client.connect();
    const listed = client.request("conversation:list");
    await flush();
    server.last.accept();
    await connecting;
    await flush();
    const frame = server.last.one("conversation:list");
    server.last.reply(frame, "conversation:list", { conversations: [] });
    assert.deepEqual((await listed).data, { conversations: [] });
  });
});

describe("reconnecting", () => {
  it("backs off exponentially with full jitter, first within 1 s, capped at 30 s", async () => {
    let calls = 0;
    const { client, server, clock } = await connected({
      token: () => `tok${++calls}`, random: () => 0.999,
    });
    assert.equal(calls, 1);
    const started = [];
    server.last.serverClose(1006);
    for (let attempt = 0; attempt < 8; attempt++) {
      const before = server.sockets.length;
      const t0 = clock.time;
      while (server.sockets.length === before) await clock.advance(10);
      started.push(clock.time - t0);
      server.last.refuse();
    }
    // random() ≈ 1 gives the ceiling of each window: 1, 2, 4, 8, 16, 30, 30, 30 s.
    const ceilings = [1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000];
    started.forEach((ms, i) => assert.ok(ms <= ceilings[i] && ms >= ceilings[i] * 0.99 - 10, `${i}: ${ms}`));
    assert.equal(calls, 9, "the token function is called before every attempt");
    assert.equal(server.sockets.at(-1)?.token, "tok9");
    assert.equal(client.state, "reconnecting");
  });

  it("full jitter: the delay is random() × the window", async () => {
    const { server, clock } = await connected({ random: () => 0.25 });
    server.last.serverClose(1001, "server_shutdown");
    await clock.advance(249);
    assert.equal(server.sockets.length, 1);
    await clock.advance(2);
    assert.equal(server.sockets.length, 2);
  });

  it("the backoff starts over after a connection is established", async () => {
    const { server, clock } = await connected();
    server.last.serverClose(1006);
    await clock.advance(1000);
    server.last.refuse();
    await clock.advance(2000);
    server.last.accept();
    await flush();
    server.last.serverClose(1006);
    await clock.advance(999);
    assert.equal(server.sockets.length, 3);
    await clock.advance(2);
    assert.equal(server.sockets.length, 4);
  });

  it("4004 disconnected is never retried", async () => {
    const { client, server, clock, states } = await connected({ token: () => "t" });
    server.last.serverClose(4004, "disconnected");
    await clock.advance(120_000);
    assert.equal(server.sockets.length, 1);
    assert.equal(client.state, "closed");
    assert.deepEqual(states, ["connecting", "open", "closed"]);
  });

  it("4001 token_expired: closed with a static token, retried with a fresh one from a function", async () => {
    const fixed = await connected();
    fixed.server.last.serverClose(4001, "token_expired");
    await fixed.clock.advance(120_000);
    assert.equal(fixed.server.sockets.length, 1);
    assert.equal(fixed.client.state, "closed");

    let n = 0;
    const refreshed = await connected({ token: () => `fresh${++n}` });
    refreshed.server.last.serverClose(4001, "token_expired");
    await refreshed.clock.advance(1000);
    assert.equal(refreshed.server.sockets.length, 2);
    assert.equal(refreshed.server.last.token, "fresh2");
  });

  it("a static token that has expired is not retried after a restart", async () => {
    const clock = new FakeClock();
    const token = fakeJwt({ sub: "alice", exp: Math.floor(clock.time / 1000) + 60 });
    const server = new FakeServer();
    const client = new WinkrClient({ url: "ws://t/ws", token, WebSocket: server.WebSocket, timers: clock, random: () => 1 });
    const connecting = client.connect();
    await flush();
    server.last.accept();
    await connecting;
    server.last.serverClose(1001, "server_shutdown");
    await clock.advance(1000); // attempt 2: the token is still valid, the server is down
    server.last.refuse();
    await clock.advance(61_000);
    const attempts = server.sockets.length;
    server.last.refuse(); // after exp: the server says 401, which a browser cannot see
    await clock.advance(600_000);
    assert.ok(server.sockets.length <= attempts + 1, `${server.sockets.length} attempts`);
    assert.equal(client.state, "closed");
  });
});

describe("requests", () => {
  it("match replies by ref and reject with the server's error", async () => {
    const { client, server } = await connected();
    const a = client.request("user:status", { status: "away" });
    const b = client.request("user:status", { status: "nope" });
    await flush();
    const [fa, fb] = server.last.take("user:status");
    assert.notEqual(fa.ref, fb.ref);
    server.last.deliver({ event: "error", ref: fb.ref, data: {
      code: "VALIDATION_ERROR", message: "bad status", details: { field: "status" }, request_event: "user:status" } });
    server.last.reply(fa, "user:status_updated", { status: "away" });
    assert.equal((await a).data.status, "away");
    await assert.rejects(b, (err) => {
      assert.ok(err instanceof WinkrError);
      assert.equal(err.code, "VALIDATION_ERROR");
      assert.equal(err.message, "bad status");
      assert.deepEqual(err.details, { field: "status" });
      assert.equal(err.envelope?.ref, fb.ref);
      return true;
    });
  });

  it("time out", async () => {
    const { client, clock } = await connected({ requestTimeout: 2000 });
    const pending = client.request("conversation:list").catch((err) => err);
    await clock.advance(2000);
    assert.equal((await pending).code, "TIMEOUT");
  });

  it("refuse a frame over the size limit before sending it", async () => {
    const { client, server } = await connected();
    await assert.rejects(client.sendMessage(C, "x".repeat(40_000)), { code: "MESSAGE_TOO_LARGE" });
    assert.equal(server.last.sent.length, 0);
  });

  it("emit every server event by name with (data, envelope), and '*' too", async () => {
    const { client, server } = await connected();
    const seen = [];
    client.on("typing:indicator", (data, envelope) => seen.push([data.user_id, envelope.event]));
    const all = [];
    const off = client.on("*", (_data, envelope) => all.push(envelope.event));
    server.last.deliver({ event: "typing:indicator", data: { conversation_id: C, user_id: "bob", is_typing: true } });
    off();
    server.last.deliver({ event: "user:online", data: { user_id: "bob" } });
    assert.deepEqual(seen, [["bob", "typing:indicator"]]);
    assert.deepEqual(all, ["typing:indicator"]);
  });

  it("a throwing handler does not break the client", async () => {
    const { client, server } = await connected();
    const original = globalThis.reportError;
    const reported = [];
    globalThis.reportError = (err) => reported.push(err);
    try {
      client.on("user:online", () => { throw new Error("app bug"); });
      const later = [];
      client.on("user:online", (d) => later.push(d.user_id));
      server.last.deliver({ event: "user:online", data: { user_id: "bob" } });
      assert.deepEqual(later, ["bob"]);
      assert.equal(reported.length, 1);
    } finally {
      globalThis.reportError = original;
    }
  });
});

describe("sending", () => {
  it("always carries a client_message_id and resolves with the acknowledged message", async () => {
    const { client, server } = await connected();
    const sent = client.sendMessage(C, "hi");
    await flush();
    const frame = server.last.one("message:send");
    assert.equal(typeof frame.data.client_message_id, "string");
    assert.ok(frame.data.client_message_id.length >= 16);
    assert.deepEqual({ ...frame.data, client_message_id: "x" },
      { conversation_id: C, content: "hi", type: "text", metadata: {}, client_message_id: "x" });
    server.last.reply(frame, "message:new", { message: msg(C, 1, "alice", { content: "hi" }), sender: {} });
    assert.equal((await sent).seq, 1);
  });

  it("queues while disconnected and resends an unanswered send with the same client_message_id", async () => {
    const { client, server, clock } = await connected();
    const first = client.sendMessage(C, "one");
    await flush();
    const original = server.last.one("message:send");
    server.last.serverClose(1006); // no ack: outcome unknown
    const second = client.sendMessage(C, "two", { clientMessageId: "mine-2" });
    await clock.advance(1000);
    server.last.accept();
    await flush();
    const resent = server.last.take("message:send");
    assert.deepEqual(resent.map((f) => f.data.client_message_id), [original.data.client_message_id, "mine-2"]);
    server.last.reply(resent[0], "message:new", { message: msg(C, 1, "alice"), sender: {} });
    server.last.reply(resent[1], "message:new", { message: msg(C, 2, "alice"), sender: {} });
    assert.equal((await first).seq, 1);
    assert.equal((await second).seq, 2);
  });

  it("a send that gets no answer on an open connection means a dead connection: reconnect and resend", async () => {
    const { client, server, clock } = await connected({ requestTimeout: 5000 });
    const sent = client.sendMessage(C, "hello?");
    await flush();
    const original = server.last.one("message:send");
    await clock.advance(5000);
    assert.equal(server.sockets[0].closedWith?.code, 4000);
    await clock.advance(1000);
    assert.equal(server.sockets.length, 2);
    server.last.accept();
    await flush();
    const resent = server.last.one("message:send");
    assert.equal(resent.data.client_message_id, original.data.client_message_id);
    server.last.reply(resent, "message:new", { message: msg(C, 1, "alice"), sender: {} });
    assert.equal((await sent).seq, 1);
  });

  it("rejects a refused send (no retry loop)", async () => {
    const { client, server } = await connected();
    const sent = client.sendMessage(C, "spam");
    await flush();
    const frame = server.last.one("message:send");
    server.last.deliver({ event: "error", ref: frame.ref, data: {
      code: "RATE_LIMITED", message: "slow down", details: { retry_after: 2, limit: "30/minute" }, request_event: "message:send" } });
    await assert.rejects(sent, { code: "RATE_LIMITED" });
  });
});

describe("catch-up: every message exactly once, in seq order", () => {
  it("a fresh join starts from the newest message; live messages follow", async () => {
    const { client, server, messages } = await connected();
    const joined = client.join(C);
    await answerJoin(server.last, C, 7);
    await joined;
    server.last.deliver(newMessage(C, 8));
    server.last.deliver(newMessage(C, 8)); // a duplicate is dropped
    assert.deepEqual(messages.map((m) => m.seq), [8]);
  });

  it("after a reconnect: re-join, page through after_seq, merge live messages arriving meanwhile", async () => {
    const { client, server, clock, messages } = await connected();
    const joined = client.join(C);
    await answerJoin(server.last, C, 2);
    await joined;
    server.last.serverClose(1001, "server_shutdown");
    await clock.advance(1000);
    const ws = server.last;
    ws.accept();
    await flush();
    const join = ws.one("conversation:join");
    assert.equal(join.data.conversation_id, C);
    ws.reply(join, "conversation:joined", { conversation_id: C });
    await flush();
    const page1 = ws.one("message:history");
    assert.deepEqual(page1.data, { conversation_id: C, after_seq: 2, limit: 100 });
    ws.deliver(newMessage(C, 6)); // live, ahead of the catch-up
    ws.deliver(newMessage(C, 5));
    ws.reply(page1, "message:history", { conversation_id: C, messages: [msg(C, 3), msg(C, 4)], has_more: true });
    await flush();
    const page2 = ws.one("message:history");
    assert.equal(page2.data.after_seq, 6, "5 and 6 came live: no need to fetch them");
    ws.reply(page2, "message:history", { conversation_id: C, messages: [], has_more: false });
    await flush();
    ws.deliver(newMessage(C, 6));
    ws.deliver(newMessage(C, 7));
    assert.deepEqual(messages.map((m) => m.seq), [3, 4, 5, 6, 7]);
    assert.deepEqual(messages.map((m) => m.replayed), [true, true, false, false, false]);
    assert.equal((await joined).data.conversation_id, C);
  });

  it("a gap in live messages is filled from history before going on", async () => {
    const { client, server, messages } = await connected();
    const joined = client.join(C);
    await answerJoin(server.last, C, 3);
    await joined;
    server.last.deliver(newMessage(C, 6));
    await flush();
    const fill = server.last.one("message:history");
    assert.equal(fill.data.after_seq, 3);
    server.last.reply(fill, "message:history", { conversation_id: C, messages: [msg(C, 4), msg(C, 5), msg(C, 6)], has_more: false });
    await flush();
    assert.deepEqual(messages.map((m) => m.seq), [4, 5, 6]);
  });

  it("the ack of an own message is emitted once even when catch-up found it first", async () => {
    const { client, server, clock, messages } = await connected();
    const joined = client.join(C);
    await answerJoin(server.last, C, 1);
    await joined;
    const sent = client.sendMessage(C, "mine");
    await flush();
    const frame = server.last.one("message:send");
    server.last.serverClose(1006); // committed as seq 2, but the ack never came
    await clock.advance(1000);
    const ws = server.last;
    ws.accept();
    await flush();
    const resent = ws.one("message:send");
    assert.equal(resent.data.client_message_id, frame.data.client_message_id);
    ws.reply(ws.one("conversation:join"), "conversation:joined", { conversation_id: C });
    await flush();
    const page = ws.one("message:history");
    ws.reply(page, "message:history", { conversation_id: C, messages: [msg(C, 2, "alice", { content: "mine" })], has_more: false });
    await flush();
    ws.reply(resent, "message:new", { message: msg(C, 2, "alice", { content: "mine" }), sender: {} }); // the original
    assert.equal((await sent).seq, 2);
    assert.deepEqual(messages.map((m) => m.seq), [2]);
  });

  it("a cached lastSeq is where catch-up starts (and messages land in the cache)", async () => {
    const cache = new MemoryCache();
    cache.put(C, [msg(C, 1), msg(C, 2)]);
    const { client, server, messages } = await connected({ cache });
    const joined = client.join(C);
    await flush();
    server.last.reply(server.last.one("conversation:join"), "conversation:joined", { conversation_id: C });
    await flush();
    const page = server.last.one("message:history");
    assert.equal(page.data.after_seq, 2);
    server.last.reply(page, "message:history", { conversation_id: C, messages: [msg(C, 3)], has_more: false });
    await joined;
    assert.deepEqual(messages.map((m) => m.seq), [3]);
    assert.deepEqual(cache.get(C).map((m) => m.seq), [1, 2, 3]);
  });

  it("a join the server refuses rejects and is not repeated after reconnects", async () => {
    const { client, server, clock } = await connected();
    const joined = client.join("nope");
    await flush();
    const frame = server.last.one("conversation:join");
    server.last.deliver({ event: "error", ref: frame.ref, data: {
      code: "NOT_FOUND", message: "conversation not found", details: { field: "conversation_id" }, request_event: "conversation:join" } });
    await assert.rejects(joined, { code: "NOT_FOUND" });
    assert.deepEqual(client.joined, []);
    server.last.serverClose(1006);
    await clock.advance(1000);
    server.last.accept();
    await flush();
    assert.equal(server.last.take("conversation:join").length, 0);
  });

  it("a closed conversation (unmatched) is no longer re-joined", async () => {
    const { client, server } = await connected();
    const joined = client.join(C);
    await answerJoin(server.last, C, 0);
    await joined;
    server.last.deliver({ event: "conversation:closed", data: { conversation_id: C, reason: "unmatched" } });
    assert.deepEqual(client.joined, []);
  });
});

describe("typing", () => {
  it("one typing:start per burst, typing:stop after 3 s without a keystroke", async () => {
    const { client, server, clock } = await connected();
    for (let i = 0; i < 5; i++) {
      client.typing(C);
      await clock.advance(500);
    }
    assert.equal(server.last.take("typing:start").length, 1);
    await clock.advance(2499);
    assert.equal(server.last.take("typing:stop").length, 0);
    await clock.advance(1);
    assert.deepEqual(server.last.one("typing:stop").data, { conversation_id: C });
    assert.equal(server.last.sent.find((f) => f.event.startsWith("typing"))?.ref, undefined);
  });

  it("a long burst repeats typing:start every 4 s so the server's 6 s expiry never fires", async () => {
    const { client, server, clock } = await connected();
    const starts = [];
    for (let t = 0; t <= 10_000; t += 1000) {
      client.typing(C);
      for (const f of server.last.take("typing:start")) starts.push(clock.time - 1_700_000_000_000 - 0);
      await clock.advance(1000);
    }
    for (const f of server.last.take("typing:start")) starts.push(f);
    assert.equal(server.last.sent.filter((f) => f.event === "typing:start").length, 3); // t=0, 4, 8 s
    await clock.advance(3000);
    assert.equal(server.last.take("typing:stop").length, 1);
  });

  it("sending a message ends the burst; typing while disconnected sends nothing", async () => {
    const { client, server, clock } = await connected();
    client.typing(C);
    client.sendMessage(C, "done").catch(() => {});
    await flush();
    assert.deepEqual(server.last.sent.map((f) => f.event), ["typing:start", "typing:stop", "message:send"]);
    server.last.serverClose(1006);
    client.typing(C);
    await clock.advance(5000);
    assert.equal(server.sockets[0].sent.length, 3);
  });
});

describe("tokens", () => {
  it("reads exp from a JWT", () => {
    assert.equal(tokenExpiry(fakeJwt({ sub: "a", exp: 1234 })), 1_234_000);
    assert.equal(tokenExpiry("not a jwt"), null);
  });

  it("a token function is called again for auth:refresh before exp", async () => {
    const clock = new FakeClock();
    const nowS = Math.floor(clock.time / 1000);
    let issued = 0;
    const token = () => fakeJwt({ sub: "alice", exp: nowS + 600 * ++issued, n: issued });
    const server = new FakeServer();
    const client = new WinkrClient({ url: "ws://t/ws", token, WebSocket: server.WebSocket, timers: clock });
    const refreshed = [];
    client.on("auth:refreshed", (d) => refreshed.push(d));
    const connecting = client.connect();
    await flush();
    server.last.accept();
    await connecting;
    await clock.advance(539_000);
    assert.equal(server.last.take("auth:refresh").length, 0);
    await clock.advance(1000); // exp − 60 s
    const frame = server.last.one("auth:refresh");
    assert.equal(issued, 2);
    assert.equal(JSON.parse(Buffer.from(frame.data.token.split(".")[1], "base64url").toString()).n, 2);
    server.last.reply(frame, "auth:refreshed", { expires_at: "later" });
    await flush();
    assert.equal(refreshed.length, 1);
    await clock.advance(600_000); // the next refresh: 60 s before the new exp (1200 s)
    assert.equal(server.last.take("auth:refresh").length, 1);
  });
});

describe("close()", () => {
  it("stops everything: pending requests reject, no reconnect, no timers left", async () => {
    const { client, server, clock, states } = await connected({ token: () => "t" });
    client.typing(C);
    const outcomes = [client.request("conversation:list"), client.sendMessage(C, "x"), client.join(C)]
      .map((p) => p.then(() => "resolved", (err) => err.code));
    await client.close();
    assert.deepEqual(await Promise.all(outcomes), ["CLOSED", "CLOSED", "CLOSED"]);
    assert.equal(clock.timers.size, 0);
    await clock.advance(120_000);
    assert.equal(server.sockets.length, 1);
    assert.equal(server.last.closedWith?.code, 1000);
    assert.equal(client.state, "closed");
    assert.deepEqual(states, ["connecting", "open", "closed"]);
    await assert.rejects(client.connect(), { code: "CLOSED" });
    await assert.rejects(client.sendMessage(C, "late"), { code: "CLOSED" });
  });

  it("ends a reconnect loop", async () => {
    const { client, server, clock } = await connected();
    server.last.serverClose(1006);
    client.close();
    await clock.advance(60_000);
    assert.equal(server.sockets.length, 1);
    assert.equal(clock.timers.size, 0);
  });
});

describe("page visibility", () => {
  function fakeDocument() {
    const listeners = [];
    return {
      visibilityState: "visible",
      addEventListener: (_type, fn) => listeners.push(fn),
      removeEventListener: (_type, fn) => listeners.splice(listeners.indexOf(fn), 1),
      set(/** @type {string} */ state) {
        this.visibilityState = state;
        for (const fn of [...listeners]) fn();
      },
      listeners,
    };
  }

  it("closes after being hidden for a while and reconnects at once when visible", async () => {
    const document = fakeDocument();
    const { client, server, clock } = await connected({ document, hiddenCloseAfter: 30_000 });
    document.set("hidden");
    await clock.advance(10_000);
    document.set("visible"); // a short switch away changes nothing
    document.set("hidden");
    await clock.advance(29_999);
    assert.equal(server.last.readyState, 1);
    await clock.advance(1);
    assert.equal(server.last.closedWith?.code, 1000);
    assert.equal(client.state, "reconnecting");
    await clock.advance(600_000);
    assert.equal(server.sockets.length, 1, "no attempt while hidden");
    document.set("visible");
    await flush();
    assert.equal(server.sockets.length, 2);
    server.last.accept();
    await flush();
    assert.equal(client.state, "open");
    client.close();
    assert.equal(document.listeners.length, 0);
  });
});

describe("MemoryCache", () => {
  it("keeps the newest messages per conversation and the most recent conversations", () => {
    const cache = new MemoryCache({ maxMessages: 3, maxConversations: 2 });
    cache.put("a", [1, 2, 3, 4, 5].map((s) => msg("a", s)));
    assert.deepEqual(cache.get("a").map((m) => m.seq), [3, 4, 5]);
    assert.equal(cache.lastSeq("a"), 5);
    cache.put("b", [msg("b", 1)]);
    cache.put("c", [msg("c", 1)]);
    assert.equal(cache.lastSeq("a"), null, "the least recently used conversation went");
    cache.put("c", [msg("c", 2), msg("c", 3)]);
    assert.deepEqual(cache.get("c", { afterSeq: 1, limit: 1 }).map((m) => m.seq), [2]);
    assert.deepEqual(cache.get("c", { beforeSeq: 3 }).map((m) => m.seq), [1, 2]);
    cache.update("c", "c.2", { is_deleted: true, content: "" });
    assert.equal(cache.get("c")[1].is_deleted, true);
  });

  it("message:deleted marks the cached message as a tombstone", async () => {
    const { client, server } = await connected();
    client.cache.put(C, [msg(C, 1)]);
    server.last.deliver({ event: "message:deleted", data: { conversation_id: C, message_id: `${C}.1`, deleted_at: "t" } });
    await flush();
    const [m] = await client.cache.get(C);
    assert.equal(m.is_deleted, true);
    assert.equal(m.content, "");
  });
});
