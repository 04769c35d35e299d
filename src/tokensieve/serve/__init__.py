"""`tokensieve serve`: an OpenAI-compatible HTTP server over one engine (FastAPI + uvicorn, `tokensieve[serve]`).

`app.create_app(engine, config)` builds the ASGI app; `command.register` adds the CLI command. This package
imports FastAPI only in the modules that need it, so the CLI works without the extra installed.
"""
