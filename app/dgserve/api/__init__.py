"""The HTTP API: ``create_app(settings)`` builds it, ``processes.run(settings)`` serves it.

The API is a thin front-end over the serving service (``dgserve.serving.service``):
routes translate HTTP into service calls and results back into JSON. What a route
needs it declares as a FastAPI dependency from ``dgserve.api.deps``, so a test can
override any of them.
"""
