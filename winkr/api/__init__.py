"""The server API for the app's backend (contract §13; docs/server-api.md)."""
