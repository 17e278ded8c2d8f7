"""mlxd's HTTP surface: OpenAI wire formats, SSE, errors."""
