"""Serving: ``blsp serve`` (OpenAI-compatible HTTP API with a batching engine) and ``blsp ui`` (Gradio demo).

``server.create_app(pipeline, ServerSettings(...))`` gives the ASGI app (its routes are the
module's functions, sharing ``server.ServerState``); ``engine.BatchEngine`` the batching queue;
``openai_api`` the settings, request schemas, limits and error shapes; ``messages`` OpenAI
messages -> conversations; ``audio_sources`` fetching, budget checks and decoding of audio parts;
``responses`` the answers; ``middleware`` body limit, Host check and API key.
"""
