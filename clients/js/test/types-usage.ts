// Compiled by `tsc -p tsconfig.json` (never run): an app's view of winkr-client.d.ts.
import { MemoryCache, WinkrClient, WinkrError, type Message, type MessageCache } from "../winkr-client.js";

async function app(getToken: () => Promise<string>): Promise<Message> {
  const cache: MessageCache = new MemoryCache({ maxMessages: 50 });
  const client = new WinkrClient({ url: "wss://chat.example.com/ws", token: getToken, cache });
  const off = client.on("message:new", ({ message, sender }) => console.log(sender.username, message.seq));
  client.on("state", (state, info) => console.log(state, info.previous, info.code));
  client.on("typing:indicator", (data) => console.log(data.is_typing));
  await client.connect();
  await client.join("conv-1");
  client.typing("conv-1");
  const page = await client.history("conv-1", { beforeSeq: 10, limit: 20 });
  const first: Message | undefined = page.messages[0];
  if (first) await client.markRead("conv-1", first.id);
  off();
  try {
    return await client.sendMessage("conv-1", "hi", { metadata: {} });
  } catch (err) {
    if (err instanceof WinkrError && err.code === "RATE_LIMITED") console.log(err.details.retry_after);
    throw err;
  } finally {
    await client.close();
  }
}
export { app };
