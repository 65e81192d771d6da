"""The temporary Prefect server of a command-line run, bound to the run's process.

With no PREFECT_API_URL, Prefect starts a temporary server (a uvicorn child) on first use and
stops it at exit. A process killed with SIGKILL never reaches that exit, and its server kept
running for good (~230 MB and a little CPU each; the next run started another). Here the server
is started before the flow, from the main thread, with Linux's parent-death signal set: the
kernel sends it SIGTERM when this process dies, however it dies. Prefect's own code then finds
it, because the server class is a per-port singleton and this one is registered under the key
Prefect looks up (`SubprocessASGIServer()`, no port), as `prefect_test_harness` does.

Outside Linux (no prctl) nothing changes: Prefect starts and stops its server as before.
"""

from __future__ import annotations

import ctypes
import functools
import signal
import subprocess
import sys
import threading
from typing import Any
from unittest import mock

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGTERM to it when the forking thread ends."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _bound_server_class() -> type:
    from prefect.server.api.server import SubprocessASGIServer

    class BoundServer(SubprocessASGIServer):
        """Prefect's temporary server, started with the parent-death signal. Prefect builds the
        uvicorn command line and environment inside one method that calls Popen; wrapping Popen
        for that one call keeps Prefect's command as it is (copying it would drift on upgrade)."""

        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            bound = functools.partial(subprocess.Popen, preexec_fn=_die_with_parent)
            with mock.patch.object(subprocess, "Popen", bound):
                return super()._run_uvicorn_command()

    return BoundServer


def _needs_temporary_server() -> bool:
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    return not settings.api.url and settings.server.ephemeral.enabled


def bind_temporary_server() -> None:
    """Start the temporary server this process would start anyway, tied to its life; nothing
    when a server is configured (PREFECT_API_URL) or the platform has no parent-death signal.
    Prefect stops it at exit as it stops its own (an atexit hook that runs after its log and
    event workers have sent what they hold)."""
    if (
        not sys.platform.startswith("linux")
        or threading.current_thread() is not threading.main_thread()  # the signal follows the forking thread
        or not _needs_temporary_server()
    ):
        return
    from prefect.server.api.server import SubprocessASGIServer

    if None in SubprocessASGIServer._instances:  # already started in this process
        return
    _bound_server_class()().start()  # registers itself under the key Prefect looks up
