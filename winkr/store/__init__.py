"""SQLite storage: the schema and its migrations, the synchronous store, and the writer actor."""
