"""Processes of a training run: a free port, workers that die with their launcher, one trainer per folder."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM):
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets ``sig`` when its parent dies.

    Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG)``); torchrun, on SIGTERM, stops its own
    workers.  Elsewhere it does nothing (returns None, so no ``preexec_fn`` is installed).
    """
    if not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()

    def set_parent_death_signal() -> None:
        _on_parent_death(sig, parent)

    return set_parent_death_signal


def follow_parent(sig: int = signal.SIGKILL) -> None:
    """This process gets ``sig`` when its parent dies (Linux; elsewhere nothing).

    For a worker under torchrun: torchrun stops its workers itself when it is asked to, but if it is
    killed (Slurm kills a job step's launcher first) a worker blocked in a collective with a dead peer
    would otherwise live on, orphaned, until the collective times out.
    """
    if sys.platform.startswith("linux"):
        _on_parent_death(sig, os.getppid())


def _on_parent_death(sig: int, parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), sig)
