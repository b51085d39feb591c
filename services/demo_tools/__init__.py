"""A small MCP server shipped with toolbus for demos, tests and benchmarks."""
