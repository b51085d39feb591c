"""MCP gateway: any MCP client calls the mesh's tools over streamable HTTP, without knowing NATS exists."""
