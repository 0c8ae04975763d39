"""Open-Sora's three-level buckets (resolution, frames, aspect ratio): pure Python.

Imports only the standard library and numpy, so the same functions run in
preprocessing workers, in the training sampler and in `sora bucket-report`.
"""
