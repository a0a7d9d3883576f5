"""Inference product: generation engine, state snapshots, OpenAI-compatible server, chat/ask/serve commands."""
