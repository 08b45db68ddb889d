"""The daemon's stages, each a class with `async run()`, joined by bounded queues:

claimer -> downloader -> decoder pool -> embed loop -> store

Every item on every queue is an `Attempt` (runner/attempt.py) passed by reference;
`Inflight` is the one place where an attempt's end is decided.
"""
