"""The broker seam: how the nodes of one service tell each other what happened (contract §16).

``Broker`` is the interface (``winkr.broker.base``); ``InProcessBroker`` (``winkr.broker.memory``)
is one node's behaviour of old and the bus several nodes share inside one trio run (tests);
``RedisBroker`` (``winkr.broker.redis``, imported only when ``broker_url`` names a Redis) joins
real processes. The bus is a hint, the database is the record: rooms deliver strictly
``seq = last + 1`` and fill gaps from the store (``winkr.room``).
"""
from winkr.broker.base import (
    ALL,
    BROADCAST_TOPIC,
    Broker,
    BusEvent,
    Incoming,
    Resync,
    conversation_topic,
    user_topic,
)
from winkr.broker.memory import InProcessBroker

__all__ = ["ALL", "BROADCAST_TOPIC", "Broker", "BusEvent", "InProcessBroker", "Incoming", "Resync",
           "conversation_topic", "user_topic"]
