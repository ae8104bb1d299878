"""Where Ray comes from: installed or not, a cluster attached or a local one started (and its processes reaped),
an address checked in seconds. No model, worker or torch import: `validate` asks it before anything loads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..errors import UserError, first_line

logger = logging.getLogger(__name__)

INSTALL_RAY = 'pip install "synthaug[ray]"'

REAPER = Path(__file__).with_name("_reaper.py")  # run as a file: `python -m` would import torch first


def import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise UserError(f"`run.executor` is 'ray' but Ray is not installed ({e}): install it with "
                        f"`{INSTALL_RAY}`, or pass --executor local to build in this process.") from None
    return ray


def resolve_executor(run: RunConfig, *, say: bool = True) -> str:
    """``"ray"`` or ``"local"``: `run.executor`, with ``"auto"`` resolved to Ray when it is installed (or a cluster
    address is given, which only Ray can use) and to this process otherwise, said in one log line unless `say` is
    False (the checks ask too; the driver says it, once per build)."""
    if run.executor != "auto":
        return run.executor
    if run.ray_address:
        return "ray"
    try:
        import ray  # noqa: F401 (whether it imports is the question)

        return "ray"
    except ImportError:
        pass
    if say:
        logger.info("run.executor auto: Ray is not installed, so the build runs in this process (`%s` for actors, one "
                    "per GPU)", INSTALL_RAY)
    return "local"


class _Reaper:
    """Start the reaper (`synthaug.builder._reaper`) before a local Ray; close it after ``ray.shutdown()``.

    A SIGKILLed driver leaves some of the processes its local Ray spawned running; the reaper, a separate process
    watching the driver through a pipe, terminates them when the pipe closes.
    """

    def __init__(self) -> None:
        existing: list[str] = []
        with contextlib.suppress(Exception):  # without psutil the reaper keeps nothing out; it still only kills kids
            import psutil

            existing = [str(p.pid) for p in psutil.Process().children()]
        self.proc = subprocess.Popen(
            [sys.executable, str(REAPER), str(os.getpid()), *existing], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True,
        )

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=15)


@contextlib.contextmanager
def _quiet_logger(name: str):
    """Raise logger `name` to ERROR for the duration of the block."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def init_local_ray(ray: Any, attempts: int = 3, **kwargs: Any) -> None:
    """Start a local Ray: a new cluster even where `ray start` left one running (attaching is what ``ray_address``
    is for), without the dashboard, which a build does not need.

    The raylet gives its metrics agent a hard-coded 15 s to start (ray-project/ray#65983); on a loaded machine the
    agent can miss that and Ray fails with "The current node timed out during startup". That is worth another try.
    """
    for attempt in range(1, attempts + 1):
        try:
            # Ray turns token authentication on for a new local cluster and says so at WARNING on every start. The
            # cluster is this build's own and lives as long as the build: keep the protection, drop the notice.
            with _quiet_logger("ray._private.authentication.authentication_token_setup"):
                ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING, **kwargs)
            return
        except Exception as e:  # Ray raises a bare Exception for this
            if "timed out during startup" not in str(e) or attempt == attempts:
                raise
            logger.warning("local Ray did not start in time (attempt %d of %d; a loaded machine?): trying again",
                           attempt, attempts)
            with contextlib.suppress(Exception):
                ray.shutdown()


# How long the address probe waits for a Ray cluster's port to accept a connection.
RAY_PROBE_TIMEOUT_S = 5.0


def check_ray_address(address: str | None, resume: str) -> None:
    """Fail in seconds, on one line, where Ray would spend minutes: an address of no form Ray takes, or a
    ``host:port`` / ``ray://host:port`` whose port accepts no connection (Ray itself retries a dead GCS address for
    ~14 minutes, then raises a traceback). ``auto`` and ``local`` are Ray's to resolve (`ray_session`).

    `resume` ends each message: how to run the build again once the cluster is up.
    """
    if not address or address in ("auto", "local"):
        return
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in target:
        raise UserError(f"`run.ray_address` {address!r} is not an address Ray takes: pass 'auto' (the cluster "
                        f"`ray start` runs on this machine), 'HOST:PORT' (its GCS, port 6379 by default) or "
                        f"'ray://HOST:10001' (Ray Client), or leave it unset for a local Ray.")
    try:
        socket.create_connection((host, int(port)), timeout=RAY_PROBE_TIMEOUT_S).close()
    except OSError as e:
        raise UserError(f"`run.ray_address` {address!r}: nothing accepts connections there ({e.strerror or e}): start "
                        f"the cluster (`ray start --head`) or fix the address, then {resume}.") from None


@contextlib.contextmanager
def ray_session(address: str | None, resume: str = "run the same command again"):
    """Use the caller's Ray session if there is one; else attach to `address`; else start a local Ray (and stop it).

    Ray failing to attach or to start is one `UserError` line ending with `resume`, not Ray's traceback.
    """
    ray = import_ray()
    if ray.is_initialized():  # the caller's session: neither started nor stopped here
        yield ray
        return
    address = address or os.environ.get("RAY_ADDRESS")  # `ray job submit` sets RAY_ADDRESS for its driver
    if address:
        check_ray_address(address, resume)
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except Exception as e:  # noqa: BLE001 (Ray raises ConnectionError, ValueError or a bare Exception here)
            with contextlib.suppress(Exception):
                ray.shutdown()
            raise UserError(f"`run.ray_address` {address!r}: Ray could not attach ({first_line(e, typed=True)}): "
                            f"start the cluster (`ray start --head`) or fix the address, then {resume}.") from None
        try:
            yield ray
        finally:
            ray.shutdown()
        return
    reaper = _Reaper()
    try:
        try:
            init_local_ray(ray)
        except Exception as e:  # noqa: BLE001 (Ray raises a bare Exception when its processes do not come up)
            raise UserError(f"`run.executor` 'ray': a local Ray could not start ({first_line(e, typed=True)}): check "
                            f"free memory and /dev/shm, or pass --executor local; then {resume}.") from None
        yield ray
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        reaper.close()


