"""`parscale serve`: an OpenAI-compatible HTTP server over one `parscale.runtime.Model`.

- `protocol`: request validation (OpenAI-style JSON errors, 4xx for every bad input) and responses;
- `chat`: chat templates (the export's tokenizer_config.json), rendered in a Jinja2 sandbox;
- `batcher`: the scheduler: one thread runs the model, requests with the same P decode together,
  joining a running batch between two steps (`parscale.runtime.batch`);
- `app`: the ASGI app (Starlette) and `serve`, which runs it under uvicorn;
- `ray_app`: the same app as a Ray Serve deployment, one `Model` per replica.

Needs the `serve` extra (starlette, uvicorn, jinja2); `ray_app` needs `ray[serve]` too.
"""
