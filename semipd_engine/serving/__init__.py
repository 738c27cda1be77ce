"""The OpenAI-compatible server around an engine client: HTTP, validation, (de)tokenization, Prometheus metrics."""
