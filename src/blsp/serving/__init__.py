"""Serving: ``blsp serve`` (OpenAI-compatible HTTP API with a batching engine) and ``blsp ui`` (Gradio demo).

``server.create_app(pipeline, ServerSettings(...))`` gives the ASGI app; ``engine.BatchEngine`` the
batching queue; ``openai_api`` the request parsing, limits and error shapes.
"""
