#!/usr/bin/env python3
"""A small terminal chat on winkr.client: talk to one peer.

usage: python scripts/chat.py TOKEN PEER_USER_ID [--url ws://127.0.0.1:8080/ws]

Creates (or finds) the two-person conversation with PEER, shows the last messages and
every new one, sends each line you type, marks what you see as read, tells the peer while
you type, shows ✓ (stored), ✓✓ (delivered) and "read" for your messages and when the peer is
typing or online. It reconnects by itself when the server restarts and catches up on what
it missed. Commands: /more (older messages), /quit (or Ctrl-C, Ctrl-D).
"""
from __future__ import annotations

import argparse
import os
import sys
import termios
import tty
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

if __package__ in (None, ""):  # `python scripts/chat.py`: the checkout's root, so that winkr imports from it too
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from winkr.client import Client, WinkrError, open_client

HISTORY_PAGE = 20


class Screen:
    """Messages scroll above one input line that holds what you are typing."""

    def __init__(self, raw: bool) -> None:
        self.raw = raw
        self.buffer = ""
        self.status = ""

    def print(self, text: str) -> None:
        if self.raw:
            sys.stdout.write("\r\x1b[K" + text.replace("\n", "\r\n") + "\r\n")
            self.redraw()
        else:
            print(text, flush=True)

    def redraw(self) -> None:
        if self.raw:
            status = f"[{self.status}] " if self.status else ""
            sys.stdout.write(f"\r\x1b[K{status}> {self.buffer}")
            sys.stdout.flush()

    def set_status(self, status: str) -> None:
        self.status = status
        self.redraw()


@contextmanager
def cbreak(fd: int) -> Any:
    """Keys one by one (Ctrl-C still interrupts); the terminal is restored whatever happens."""
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def read_input(fd: int) -> str:
    # A blocking read in a thread that trio may abandon, so Ctrl-C never waits for a key.
    data = await trio.to_thread.run_sync(os.read, fd, 1024, abandon_on_cancel=True)
    return data.decode(errors="replace")


class Chat:
    def __init__(self, client: Client, screen: Screen, conversation_id: str, peer: str) -> None:
        self.client, self.screen = client, screen
        self.conversation_id, self.peer = conversation_id, peer
        self.me = client.user_id
        self.seen: dict[str, int] = {}  # message id -> seq
        self.oldest: int | None = None
        self.nursery: trio.Nursery | None = None  # for sends and reads that must not hold up the keyboard

    def show(self, message: dict[str, Any], prefix: str = "") -> None:
        who = "you" if message["sender_id"] == self.me else message["sender_id"]
        text = "(deleted)" if message.get("is_deleted") else message.get("content") or f"[{message['type']}]"
        tick = " ✓" if who == "you" else ""
        self.screen.print(f"{prefix}{message['created_at'][11:16]} {who}: {text}{tick}")

    def on_message(self, data: dict[str, Any], envelope: dict[str, Any]) -> None:
        message = data["message"]
        if message["conversation_id"] != self.conversation_id or message["id"] in self.seen:
            return
        self.seen[message["id"]] = message["seq"]
        self.show(message)
        if message["sender_id"] != self.me:
            self.screen.set_status("")
            self.mark_read(message["id"])

    def mark_read(self, message_id: str) -> None:
        async def read() -> None:
            try:
                await self.client.mark_read(self.conversation_id, message_id)
            except WinkrError:
                pass  # the next message reads up to it anyway
        assert self.nursery is not None
        self.nursery.start_soon(read)

    def wire(self) -> None:
        client, screen = self.client, self.screen
        client.on("message:new", self.on_message)
        client.on("typing:indicator", lambda d, _e: d["user_id"] != self.me and screen.set_status(
            f"{d['username']} is typing…" if d["is_typing"] else ""))
        client.on("message:delivered", lambda d, _e: screen.print(f"  ✓✓ delivered to {d['recipient_id']}"))
        client.on("message:viewed", lambda d, _e: d.get("reader_id") not in (None, self.me) and screen.print(
            f"  read by {d['reader_id']}"))
        client.on("user:online", lambda d, _e: d["user_id"] == self.peer and screen.print(f"* {self.peer} online"))
        client.on("user:offline", lambda d, _e: d["user_id"] == self.peer and screen.print(f"* {self.peer} offline"))
        client.on("state", lambda state, info: screen.print(
            "* reconnecting…" if state == "reconnecting" else "* connected" if state == "open"
            else f"* connection closed ({info.get('reason') or 'closed'})"))
        client.on("error", lambda d, e: "ref" not in e and screen.print(f"! {d['code']}: {d['message']}"))

    async def load_older(self) -> None:
        page = await self.client.history(self.conversation_id, limit=HISTORY_PAGE,
                                         before_seq=self.oldest if self.oldest is not None else None)
        if not page["messages"]:
            self.screen.print("  (no older messages)")
            return
        self.oldest = page["messages"][0]["seq"]
        for message in page["messages"]:
            self.seen.setdefault(message["id"], message["seq"])
            self.show(message, prefix="  ")
        last = [m for m in page["messages"] if m["sender_id"] != self.me]
        if last:
            self.mark_read(last[-1]["id"])

    async def send(self, text: str) -> None:
        try:
            await self.client.send_message(self.conversation_id, text)  # shown by on_message
        except WinkrError as exc:
            self.screen.print(f"! not sent: {exc.code}: {exc.message}")

    async def command(self, line: str) -> bool:
        """Handle one typed line; False to quit."""
        if line in ("/quit", "/exit"):
            return False
        if line == "/more":
            await self.load_older()
        elif line.strip():
            assert self.nursery is not None
            self.nursery.start_soon(self.send, line)
        return True

    async def run(self, raw: bool) -> None:
        async with trio.open_nursery() as self.nursery:
            await self._keyboard(raw)
            self.nursery.cancel_scope.cancel()

    async def _keyboard(self, raw: bool) -> None:
        fd = sys.stdin.fileno()
        while True:
            if not raw:
                line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
                if not line or not await self.command(line.rstrip("\n")):
                    return
                continue
            for key in await read_input(fd):
                if key in ("\r", "\n"):
                    line, self.screen.buffer = self.screen.buffer, ""
                    self.screen.redraw()
                    if not await self.command(line):
                        return
                elif key == "\x04":  # Ctrl-D
                    return
                elif key in ("\x7f", "\b"):
                    self.screen.buffer = self.screen.buffer[:-1]
                elif key.isprintable():
                    self.screen.buffer += key
                    self.client.typing(self.conversation_id)
            self.screen.redraw()


async def main(args: argparse.Namespace) -> int:
    raw = sys.stdin.isatty() and sys.stdout.isatty()
    screen = Screen(raw)
    try:
        async with open_client(args.url, args.token) as client:
            reply = await client.request("conversation:create", {"participant_ids": [args.peer]})
            conversation_id = reply["data"]["conversation"]["id"]
            chat = Chat(client, screen, conversation_id, args.peer)
            chat.wire()
            await client.join(conversation_id)
            screen.print(f"* chatting with {args.peer} as {client.user_id} (/more: older messages, /quit)")
            async with trio.open_nursery() as chat.nursery:
                await chat.load_older()
            if raw:
                with cbreak(sys.stdin.fileno()):
                    screen.redraw()
                    await chat.run(raw)
            else:
                await chat.run(raw)
    except WinkrError as exc:
        print(f"\nchat: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    finally:
        if raw:
            sys.stdout.write("\r\n")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("token", help="a JWT (winkr token USER)")
    parser.add_argument("peer", help="the user id to chat with")
    parser.add_argument("--url", default="ws://127.0.0.1:8080/ws")
    try:
        status = trio.run(main, parser.parse_args())
    except* KeyboardInterrupt:
        status = 130
    sys.exit(status)
