"""One exception type for every user-facing failure: the CLI prints its message as one line and exits 1."""


class AstroptError(Exception):
    """A failure caused by the user's input or environment, with a message that says what to do."""
