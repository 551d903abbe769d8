"""User-facing errors and the one place that turns them into a clean exit.

Every entry point is wrapped in :func:`exit_cleanly_on_user_error`: an
:class:`LmlabError` (bad spec, bad argument, missing file) prints one line,
``lmlab: error: <reason>``, exits with status 2, and, when ``mlflow run`` created a run for
the process (``MLFLOW_RUN_ID``), closes that run as FAILED with the reason in its
``lmlab.failure`` tag, so it never stays RUNNING. Argument errors go the same way
(:class:`ArgumentParser`). ``docs/errors.md`` lists every bad input and its line.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
from typing import Callable, NoReturn, TypeVar

T = TypeVar("T")

#: Exit status of a user error (argparse's own convention).
USER_ERROR_EXIT = 2
INTERRUPTED_EXIT = 130


class LmlabError(Exception):
    """A problem with the user's input or environment, reported as one clear line.

    Entry points catch it, print the message and exit non-zero without a traceback.
    """


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose errors are LmlabErrors: one line, and the run marked FAILED
    (argparse alone prints the usage block and exits before any run is closed)."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise LmlabError(f"{message} (see --help)")


def exit_cleanly_on_user_error(main: Callable[..., T]) -> Callable[..., T]:
    """Wrap an entry point so an LmlabError ends with one message and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        previous = signal.signal(signal.SIGTERM, _terminate_as_interrupt)
        try:
            return main(*args, **kwargs)
        except LmlabError as error:
            reason = " ".join(str(error).split()) or type(error).__name__
            print(f"lmlab: error: {reason}", file=sys.stderr)
            fail_launching_run(reason)
            sys.exit(USER_ERROR_EXIT)
        except KeyboardInterrupt:
            print("lmlab: interrupted; finished work is kept, rerun to resume", file=sys.stderr)
            sys.exit(INTERRUPTED_EXIT)
        finally:
            if previous is not None:  # None: a handler installed outside Python, left alone
                signal.signal(signal.SIGTERM, previous)

    return wrapper


def fail_launching_run(reason: str) -> None:
    """Close the run ``mlflow run`` created for this process as FAILED, with the reason.

    Only a run still RUNNING is touched (the sweep may already have closed it with a more
    precise reason). A store that cannot be reached is left to the message already printed.
    """
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    try:
        from mlflow.tracking import MlflowClient

        from lmlab.tracking import FAILURE_TAG

        client = MlflowClient()
        if client.get_run(run_id).info.status != "RUNNING":
            return
        client.set_tag(run_id, FAILURE_TAG, reason[:4000])
        client.set_terminated(run_id, "FAILED")
    except Exception:  # noqa: BLE001 - the user's error is already reported; never mask it
        return


def _terminate_as_interrupt(signum: int, frame: object) -> None:
    # `mlflow run` and job schedulers stop work with SIGTERM: unwind like Ctrl+C so the
    # runs in flight are closed as KILLED and finished work stays reusable.
    raise KeyboardInterrupt
