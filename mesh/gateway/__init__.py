"""Floor 4: the HTTP gateway (OpenAI, Anthropic and Ollama APIs) and the relay to the leader."""
