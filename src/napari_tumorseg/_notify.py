"""napari notifications for the plugin's messages: the problem and the file's name first.

A toast shows its first line or so. Messages led with the file's absolute path, so a user saw
".../bad/" and not what was wrong with it; here the notification reads "title: file name:
problem" and the full path is one click away (its "Full path" button).
"""

from __future__ import annotations

from functools import partial

from .core.errors import TumorSegError


def problem_text(problem: Exception | str, title: str | None = None) -> tuple[str, str | None]:
    """``(message, details)`` for a problem: the message leads with what is wrong and the
    file's name; ``details`` is the full message with the path (None when it adds nothing)."""
    if isinstance(problem, TumorSegError):
        text, details = problem.headline, str(problem)
        if details == text:
            details = None
    else:
        text, details = str(problem), None
    return (f"{title}: {text}" if title else text), details


def notify(problem: Exception | str, title: str | None = None, severity: str = "error") -> str:
    """Show ``problem`` as a napari notification of ``severity`` ("error", "warning", "info");
    returns the message shown."""
    from napari.utils.notifications import Notification, notification_manager

    message, details = problem_text(problem, title)
    actions = [("Full path", partial(_show_details, title or "napari-tumorseg", details))]
    notification_manager.dispatch(
        Notification(message, severity=severity, actions=actions if details else ())
    )
    return message


def _show_details(title: str, details: str, *args) -> None:
    from qtpy.QtWidgets import QMessageBox

    QMessageBox.information(None, title, details)
