"""The ways in beside the command line: serving the flows as deployments, the typed REST client,
the MCP server for coding agents."""
