"""The HTTP layer: thin routes over the core; the only part that knows Klein."""
