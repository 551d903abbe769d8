"""User-facing errors and the one place that turns them into a clean exit."""

from __future__ import annotations

import functools
import signal
import sys
from typing import Callable, TypeVar

T = TypeVar("T")


class LmlabError(Exception):
    """A problem with the user's input or environment, reported as one clear line.

    Entry points catch it, print the message and exit non-zero without a traceback.
    """


def exit_cleanly_on_user_error(main: Callable[..., T]) -> Callable[..., T]:
    """Wrap an entry point so an LmlabError ends with one message and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        signal.signal(signal.SIGTERM, _terminate_as_interrupt)
        try:
            return main(*args, **kwargs)
        except LmlabError as error:
            print(f"lmlab: error: {error}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("lmlab: interrupted; finished work is kept, rerun to resume", file=sys.stderr)
            sys.exit(130)

    return wrapper


def _terminate_as_interrupt(signum: int, frame: object) -> None:
    # `mlflow run` and job schedulers stop work with SIGTERM: unwind like Ctrl+C so the
    # runs in flight are closed as KILLED and finished work stays reusable.
    raise KeyboardInterrupt
