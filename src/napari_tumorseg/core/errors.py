"""The one exception type for expected input errors."""

from __future__ import annotations

from pathlib import Path


class TumorSegError(ValueError):
    """An expected problem with the user's input: a bad file, a wrong shape, a missing sequence.

    The message is meant for the user as it is (one line, naming the file and the problem); the
    CLI prints it on stderr with exit status 2 and the widgets show it as a napari notification.

    Parameters
    ----------
    problem : str
        What is wrong, in words a radiologist can act on.
    path : str or Path, optional
        The file (or folder) the problem is about; it is named at the start of the message.
    """

    def __init__(self, problem: str, path: str | Path | None = None) -> None:
        self.problem = problem
        self.path = None if path is None else Path(path)
        super().__init__(problem if path is None else f"{path}: {problem}")

    @property
    def headline(self) -> str:
        """The message for a notification: the file's name and the problem, without the
        folders (a toast showed ".../bad/" and cut the problem off); the full path is the
        message as a whole (``str(error)``)."""
        if self.path is None:
            return self.problem
        return f"{self.path.name or self.path}: {self.problem}"
