"""The stages: one module each, with its config, summary, ``run`` and its ``STAGES`` record (``pipelines.registry``)."""
