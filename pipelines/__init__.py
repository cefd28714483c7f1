"""The stages: each a plain ``run(config) -> Summary`` over idempotent units of work, plus the ``reals`` CLI."""


class StageError(Exception):
    """A stage problem a user can act on; the CLI prints it as one line."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors a user can act on: the CLI prints them as one line, a Ray Train rank returns them."""
    from reals import ReaLSError
    from storage import StorageError

    return (StageError, ReaLSError, StorageError, FileNotFoundError, NotADirectoryError, PermissionError)
