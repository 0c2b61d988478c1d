"""Winkr realtime: the WebSocket chat service (trio actors over SQLite)."""

__version__ = "0.1.0"
