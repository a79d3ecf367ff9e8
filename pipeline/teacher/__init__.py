"""The LLM teacher: an OpenAI-compatible client whose every call goes through a persistent cache."""
