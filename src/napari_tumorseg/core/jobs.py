"""Long jobs are generators that yield progress events and return a result.

Registration, inference, training and fine-tuning all have this shape, so a widget can run them
in a worker thread and stop them between yields, and scripts can run them synchronously.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any


def run_to_end(generator: Generator[Any, None, Any], on_event: Callable | None = None) -> Any:
    """Run a job synchronously and return its result; ``on_event`` sees every progress event."""
    while True:
        try:
            event = next(generator)
        except StopIteration as stop:
            return stop.value
        if on_event is not None:
            on_event(event)


def map_events(generator: Generator[Any, None, Any], function: Callable) -> Generator:
    """Re-yield ``function(event)`` for each event of a job and return the job's result.

    Closing the wrapper closes the job (so its own clean-up runs).
    """
    try:
        while True:
            try:
                event = next(generator)
            except StopIteration as stop:
                return stop.value
            yield function(event)
    finally:
        generator.close()
