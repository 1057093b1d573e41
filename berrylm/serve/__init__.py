"""Serving: the continuous-batching engine and the OpenAI-compatible HTTP API (engine.py says how it is split)."""
