"""Executor: a pool worker that runs routed calls on warm MCP sessions to its backends."""
