"""Servers as process groups: started as the leader of a new group, waited for over HTTP, and
stopped with every process they started (a SIGTERM to the group, then SIGKILL for what is left).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from cifar_pipeline.errors import PipelineError

LOOPBACK = "127.0.0.1"


class ServerFailed(PipelineError):
    """A server exited or did not answer in time; the message ends with its last log lines."""


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_group(command: list[str], log: Path | None = None, env: dict[str, str] | None = None,
                cwd: Path | None = None) -> subprocess.Popen:
    """Start `command` as the leader of a new process group (its output to `log`, or inherited)."""
    out = open(log, "ab") if log else None
    try:
        return subprocess.Popen([str(c) for c in command], env={**os.environ, **(env or {})}, cwd=cwd,
                                stdout=out, stderr=subprocess.STDOUT if out else None, start_new_session=True)
    finally:
        if out:
            out.close()


def group_members(pgid: int) -> list[psutil.Process]:
    """Every live process in process group `pgid`, and every descendant of its leader."""
    members = {}
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members[proc.pid] = proc
    with contextlib.suppress(psutil.Error):
        members.update({p.pid: p for p in psutil.Process(pgid).children(recursive=True)})
    return list(members.values())


def wait_gone(pgid: int, members: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait for `members` to exit, then SIGKILL what is left of them and of group `pgid`. Returns
    the processes that had to be killed (none when the server stopped cleanly)."""
    _, alive = psutil.wait_procs(members, timeout=timeout_s)
    alive += [p for p in group_members(pgid) if p not in alive]
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    return alive


def stop_group(proc: subprocess.Popen, timeout_s: float = 30) -> list[psutil.Process]:
    """SIGTERM the process group that `proc` leads (see start_group); returns the processes that
    had to be killed after that (see wait_gone)."""
    members = group_members(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout_s)
    return wait_gone(proc.pid, [p for p in members if p.pid != proc.pid], timeout_s)


def wait_for_http(url: str, proc: subprocess.Popen, timeout_s: float, log: Path | None = None) -> None:
    """Poll `url` until it answers 200; fail early when `proc` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerFailed(f"{proc.args[0]} exited with status {proc.returncode} before {url} answered{tail_log(log)}")
        with contextlib.suppress(urllib.error.URLError, OSError):
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        time.sleep(0.5)
    raise ServerFailed(f"{url} did not answer within {timeout_s:.0f} s{tail_log(log)}")


def tail_log(log: Path | None, lines: int = 5) -> str:
    if not log or not Path(log).exists():
        return ""
    return ":\n" + "\n".join(Path(log).read_text(errors="replace").splitlines()[-lines:])


def run_in_foreground(command: list[str], env: dict[str, str]) -> int:
    """Run a server until Ctrl-C (or SIGTERM), then stop it with all its children."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    proc = start_group(command, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        stop_group(proc)
