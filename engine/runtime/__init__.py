"""Desktop side: agent clients, the supervised inference child, chat sessions, KV status."""
