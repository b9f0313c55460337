"""Connectivity analysis over many inspection records: no FastAPI, no database, no torch.

``layout`` turns one record's connectivity into numbers in a layout that every kind's
``aggregates`` declare; ``stats`` adds them up into rollups; ``summary`` turns rollups
into the per-group statistics of ``GET /v1/models/{name}/connectivity``; ``export``
writes records as Parquet.
"""
