"""The HTTP surface: one ASGI app (Starlette) on one server (uvicorn).

- :mod:`.app`: the app with /metrics, /healthz and /readyz, the JSON error shape, the
  middleware that turns a handler's failure into one scrubbed log line and a 500, and the
  listeners (TCP, unix socket) served by uvicorn.
- :mod:`.auth`: the bearer check of the token API.
- :mod:`.token_cache`: GET's fresh answers in memory, kept true by the store's change feed,
  and the middleware that answers them in front of the app.
- :mod:`.tokens`: the token API's routes (/v1/tokens...) and /openapi.json.
"""
