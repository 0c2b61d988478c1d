// winkr-client.d.ts declares what the JavaScript really has (tsc checks the types; this
// checks that no declared member is missing at run time).
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { it } from "node:test";

import * as lib from "../winkr-client.js";

const dts = readFileSync(new URL("../winkr-client.d.ts", import.meta.url), "utf8");

/** Member names declared in `declare class NAME { ... }`. */
function declaredMembers(name) {
  const body = dts.split(`export declare class ${name}`)[1].split("\n}\n")[0];
  return [...body.matchAll(/^ {2}(?:readonly )?([A-Za-z_]\w*)[(:?]/gm)].map((m) => m[1]).filter((n) => n !== "constructor");
}

it("every exported name of the .d.ts exists", () => {
  for (const [, name] of dts.matchAll(/^export declare (?:class|function|const) (\w+)/gm)) {
    assert.ok(name in lib, name);
  }
});

it("every member of WinkrClient, MemoryCache and WinkrError exists", () => {
  const client = new lib.WinkrClient({ url: "ws://x/ws", token: "t", WebSocket: class {} });
  for (const name of declaredMembers("WinkrClient")) assert.ok(name in client, `WinkrClient.${name}`);
  const cache = new lib.MemoryCache();
  for (const name of declaredMembers("MemoryCache")) assert.ok(name in cache, `MemoryCache.${name}`);
  const error = new lib.WinkrError("X", "y");
  for (const name of declaredMembers("WinkrError")) assert.ok(name in error, `WinkrError.${name}`);
  assert.ok(declaredMembers("WinkrClient").length >= 15);
});
