"""The wire protocol: envelopes, request types and event payloads. Pure: no I/O, no trio."""
