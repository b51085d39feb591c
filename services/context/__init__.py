"""Context store: versioned MCP context sessions in Redis, rendered to a token budget, handed between agents."""
