"""An MCP server with the fixtures the MCP conformance suite expects, to run the suite against."""
