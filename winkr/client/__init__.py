"""winkr.client: the Python client library (contract §15) — reconnect with backoff, exactly-once
catch-up, queued idempotent sends, typing debounce, token refresh and a local cache, on trio.

    async with open_client("ws://127.0.0.1:8080/ws", token) as client:
        client.on("message:new", lambda data, envelope: print(data["message"]["content"]))
        await client.join(conversation_id)
        await client.send_message(conversation_id, "Hey!")

docs/clients.md describes every method and guarantee.
"""
from winkr.client.cache import MemoryCache, Message, MessageCache
from winkr.client.core import STATES, Client, Connector, TokenSource, WinkrError, open_client, token_expiry

__all__ = ["STATES", "Client", "Connector", "MemoryCache", "Message", "MessageCache", "TokenSource",
           "WinkrError", "open_client", "token_expiry"]
