"""The reaper: a tiny watchdog process beside a driver that started its own local Ray.

Started by `synthaug.builder.cluster` as ``python path/to/_reaper.py DRIVER_PID [KEEP_PID ...]``,
with a pipe on its standard input. Ray ties gcs_server and the raylet to the driver (PR_SET_PDEATHSIG), but a
SIGKILLed driver still leaves the processes the raylet spawned (the dashboard and runtime-env agents) running forever.
The reaper records, every half second, every process that descends from the driver (except the KEEP_PIDs, which
existed before Ray started, their descendants, and itself); when the driver's pipe closes — a clean exit after
``ray.shutdown()``, or the driver's death — it terminates the recorded processes that still run, by pid and creation
time (a pid reused by an unrelated process is never touched).

It runs as a file rather than as ``python -m synthaug.builder._reaper`` (which works too) because ``-m`` first imports
the ``synthaug.builder`` package, and with it torch: seconds and hundreds of MB before the watch starts. As a file it
imports only the standard library and psutil (about 1.5 s with Ray's copy of psutil).
"""

from __future__ import annotations

import os
import select
import sys

if __name__ == "__main__" and sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]  # run as a file: the modules beside it (plan.py, worker.py, ...) must not shadow top-level ones

try:
    import psutil
except ImportError:  # Ray ships its own copy of psutil and puts it on sys.path when imported
    import ray  # noqa: F401, I001 (ray first: importing it puts its psutil on sys.path)
    import psutil

POLL_SECONDS = 0.5  # how often the process tree is recorded
TERMINATE_GRACE_SECONDS = 5  # SIGTERM, then SIGKILL for what is still running after this long


def _record(driver: int, keep: set[int], me: int, seen: dict[int, float]) -> bool:
    """Add the driver's descendants to `seen` (pid -> creation time); False once the driver is gone."""
    try:
        kids = psutil.Process(driver).children(recursive=True)
    except psutil.Error:
        return False
    for p in kids:
        try:
            if p.pid == me or p.pid in keep or any(a.pid in keep for a in p.parents()):
                continue
            seen.setdefault(p.pid, p.create_time())
        except psutil.Error:
            pass
    return True


def _terminate(seen: dict[int, float]) -> None:
    """Terminate (then kill) the recorded processes that still run with the same creation time."""
    procs = []
    for pid, created in seen.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == created:
                procs.append(p)
        except psutil.Error:
            pass
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=TERMINATE_GRACE_SECONDS)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def main(argv: list[str]) -> None:
    driver, keep, me = int(argv[0]), {int(p) for p in argv[1:]}, os.getpid()
    seen: dict[int, float] = {}
    while _record(driver, keep, me, seen):
        ready, _, _ = select.select([sys.stdin], [], [], POLL_SECONDS)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break
    _terminate(seen)


if __name__ == "__main__":
    main(sys.argv[1:])
