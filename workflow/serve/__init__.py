"""The serving gateway: OpenAI-compatible, TLS 1.3, role-based, audited."""
