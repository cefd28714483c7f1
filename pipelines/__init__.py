"""The stages: each a plain ``run(config) -> Summary`` over idempotent units of work, plus the ``reals`` CLI."""


class StageError(Exception):
    """A stage problem a user can act on; the CLI prints it as one line."""
