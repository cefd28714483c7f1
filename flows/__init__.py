"""Prefect flows over the stages: one flow per stage, the end-to-end ``reals_pipeline``, artifacts, deployments.

Only the ``reals`` CLI reaches this package (lazily, for ``reals pipeline``, ``reals demo`` and ``reals serve``).
"""
