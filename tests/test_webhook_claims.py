"""Webhook events are claimed once across nodes (contract §16: each event sent once per
attempt, not once per node): two writers on one PostgreSQL database claiming at the same time
never get the same event, and neither waits for the other's claim."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import make_settings

from winkr.store.engine import open_engine
from winkr.store.store import Store
from winkr.store.webhook_outbox import DueEvent, due, enqueue

ENABLED = ("message.created",)


@pytest.mark.postgres_only
def test_two_nodes_claiming_at_once_never_claim_the_same_event(tmp_path: Path, engine: Any) -> None:
    pg = open_engine(make_settings(tmp_path).database)
    first_node, second_node = Store(pg.open_writer()), Store(pg.open_writer())
    now = time.time()
    first_node.db.begin()
    made = {enqueue(first_node, "message.created", {"n": n}, now - 10 + n, ENABLED) for n in range(2)}
    first_node.db.commit()

    first_node.db.begin()
    claimed_first = due(first_node, now, 1, lease=60.0)  # its transaction still holds the claim
    claimed_second: list[list[DueEvent]] = []

    def other_node() -> None:
        second_node.db.begin()
        claimed_second.append(due(second_node, now, 10, lease=60.0))
        second_node.db.commit()

    thread = threading.Thread(target=other_node)
    thread.start()
    thread.join(timeout=5)
    waited = thread.is_alive()
    first_node.db.commit()
    thread.join(timeout=30)
    assert not waited  # the other node passed over the event being claimed
    first_ids = {event.id for event in claimed_first}
    second_ids = {event.id for event in claimed_second[0]}
    assert not first_ids & second_ids and first_ids | second_ids == made
