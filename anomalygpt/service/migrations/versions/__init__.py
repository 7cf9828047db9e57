"""One file per schema revision, oldest first (0001 is the schema the first service release created)."""
