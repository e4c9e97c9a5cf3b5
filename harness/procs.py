"""Stopping what a harness started: by its process group, never by name."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_group(proc: subprocess.Popen | None, timeout: float = 15) -> None:
    """SIGTERM the process group ``proc`` leads (started with ``start_new_session``), SIGKILL it
    if it is not gone within ``timeout`` seconds; nothing if it has already exited."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
