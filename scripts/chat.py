#!/usr/bin/env python3
"""A tiny interactive winkr client: chat with one peer from the terminal.

usage: python scripts/chat.py TOKEN PEER_USER_ID [--url ws://127.0.0.1:8080/ws]

Creates (or finds) the two-person conversation with PEER, joins it, sends each line you
type as a text message and prints every event it receives as one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys

import trio
from trio_websocket import ConnectionClosed, open_websocket_url


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("token")
    parser.add_argument("peer")
    parser.add_argument("--url", default="ws://127.0.0.1:8080/ws")
    args = parser.parse_args()
    headers = [("Authorization", f"Bearer {args.token}")]
    async with open_websocket_url(args.url, extra_headers=headers) as ws:
        await ws.send_message(json.dumps({"event": "conversation:create", "ref": "create",
                                          "data": {"participant_ids": [args.peer]}}))
        conversation_id = None
        while conversation_id is None:
            event = json.loads(await ws.get_message())
            print(json.dumps(event), flush=True)
            if event.get("ref") == "create":
                if event["event"] != "conversation:created":
                    sys.exit("could not create the conversation")
                conversation_id = event["data"]["conversation"]["id"]
        await ws.send_message(json.dumps({"event": "conversation:join", "ref": "join",
                                          "data": {"conversation_id": conversation_id}}))

        async def print_events() -> None:
            try:
                while True:
                    print(await ws.get_message(), flush=True)
            except ConnectionClosed:
                print("connection closed", file=sys.stderr)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(print_events)
            while line := await trio.to_thread.run_sync(sys.stdin.readline):
                if line.strip():
                    await ws.send_message(json.dumps({"event": "message:send", "data": {
                        "conversation_id": conversation_id, "content": line.rstrip("\n"),
                        "type": "text", "metadata": {}}}))
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
