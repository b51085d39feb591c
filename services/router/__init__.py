"""Router: authenticates, authorizes and validates every call, then routes it to a pool."""
