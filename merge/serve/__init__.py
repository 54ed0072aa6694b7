"""``python -m merge serve``: a combined folder behind an OpenAI-compatible HTTP API, with continuous batching
(:mod:`merge.runtime.engine`), a chat page, and the same app as a Ray Serve deployment.

Needs the ``[serve]`` extra (FastAPI, uvicorn); the runtime itself imports no web package.
"""
