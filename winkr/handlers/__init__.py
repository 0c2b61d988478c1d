"""Client events: ``registry.ROUTES`` says where each is handled; one module per subject
holds the handlers (``messages``, ``conversations``, ``typing_indicator``, ``users``,
``catchup``), written against the interfaces of ``context``."""
