"""Connecting to Ray: the cluster in RAY_ADDRESS when set, else the one `ray start` left on this
machine, else a local one started on demand. A cluster that does not answer fails in seconds."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from urllib.parse import urlsplit

from aigc_ray.errors import ConfigError

# A TCP handshake with a live GCS takes milliseconds, even across regions; Ray itself would retry
# a dead one for about ten minutes.
ALIVE_TIMEOUT_S = 2.0
RAY_CLIENT_PORT = 10001  # ray://HOST without a port


def answers(host: str, port: int, timeout_s: float = ALIVE_TIMEOUT_S) -> bool:
    """Whether something accepts a TCP connection at host:port within timeout_s."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:  # refused, timed out, no route, unknown host
        return False


def host_and_port(address: str) -> tuple[str, int] | None:
    """(host, port) of `HOST:PORT`, `[IPV6]:PORT` or a URL such as ray://HOST:PORT; None when
    the address names no port we can check (then Ray's own error stands)."""
    if "://" in address:
        url = urlsplit(address)
        try:
            port = url.port or (RAY_CLIENT_PORT if url.scheme == "ray" else None)
        except ValueError:
            return None
        return (url.hostname, port) if url.hostname and port else None
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    return (host, int(port)) if host and port.isdigit() else None


def cluster_to_join(address: str | None) -> str | None:
    """The address of the cluster `ray.init(address)` would connect to, found as Ray finds it;
    None when Ray would start a local cluster. Raises a one-line ConfigError when that cluster
    does not answer within ALIVE_TIMEOUT_S (Ray would retry for about ten minutes)."""
    if address == "local":
        return None
    from_file = not address or address == "auto"
    if from_file:
        from ray._private import services

        services.find_gcs_addresses.cache_clear()  # as ray.init does: a fresh look
        try:
            # The address file the last `ray start` wrote (its folder follows RAY_TMPDIR), or
            # with auto any GCS process on this machine.
            address = services.canonicalize_bootstrap_address(address)
        except ConnectionError:  # auto, and no cluster found
            raise ConfigError("cannot reach the Ray cluster at RAY_ADDRESS=auto: no running Ray "
                              "found on this machine; start one (`ray start --head`), or unset "
                              "RAY_ADDRESS to run on a local Ray") from None
        if address is None:
            return None
    target = host_and_port(address)
    if target and not answers(*target):
        if not from_file:
            raise ConfigError(f"cannot reach the Ray cluster at RAY_ADDRESS={address}: nothing "
                              f"answers at {target[0]}:{target[1]} within {ALIVE_TIMEOUT_S:.0f} "
                              "s; start it, or unset RAY_ADDRESS to run on a local Ray")
        from ray._common.utils import get_ray_address_file

        raise ConfigError(f"no Ray cluster answers at {address}, the address `ray start` left in "
                          f"{get_ray_address_file(None)} (that head has stopped); run `ray stop` "
                          "to forget it, or set RAY_ADDRESS=local to start a new local Ray")
    return address


def start_ray(num_cpus: int | None = None, ray_logs: bool = False) -> None:
    """`ray.init` once. Honours RAY_ADDRESS like Ray itself; a local cluster keeps Ray's token
    authentication on (the token lives in ~/.ray/auth_token, where Ray's clients find it).

    `ray_logs` forwards every worker's output to this console as Ray does by default; off, our
    driver prints one line per logging interval and Ray's worker logs stay in the session's log
    folder (errors still reach the console through the exceptions they raise).

    A Python SIGTERM handler set before this call (the CLI's: SIGTERM acts as Ctrl-C) is put back
    after `ray.init`, which replaces it with Ray's (exit 1, or a C++ stack dump and abort).
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None  # empty means unset, as for Ray
    joining = cluster_to_join(address)  # seconds, not Ray's ten minutes of retries
    # Forked tokenizers with threads only slow each other down. A value already in this
    # environment wins: inside a Ray job it comes from the job's runtime_env, and Ray refuses a
    # driver runtime_env that sets the same variable again.
    env_vars = {name: value for name, value in {"TOKENIZERS_PARALLELISM": "false"}.items()
                if name not in os.environ}
    on_sigterm = (signal.getsignal(signal.SIGTERM)
                  if threading.current_thread() is threading.main_thread() else None)
    try:
        ray.init(address=address, num_cpus=None if joining else num_cpus,
                 logging_level=logging.WARNING, configure_logging=True, log_to_driver=ray_logs,
                 runtime_env={"env_vars": env_vars} if env_vars else None)
    except ConnectionError as exc:
        if not joining:
            raise  # starting a local cluster failed: not something the command line can fix
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        if address:
            raise ConfigError(f"cannot reach the Ray cluster at RAY_ADDRESS={address}: {first}; "
                              "start it, or unset RAY_ADDRESS to run on a local Ray") from None
        raise ConfigError(f"cannot reach the Ray cluster at {joining}, the address `ray start` "
                          f"left: {first}; run `ray stop` to forget it, or set RAY_ADDRESS=local "
                          "to start a new local Ray") from None
    if callable(on_sigterm):
        signal.signal(signal.SIGTERM, on_sigterm)
    from ray.data import DataContext
    from transformers.utils import logging as hf_logging

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # It warns that the bars are off, which is what we asked for.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()

    # Our own progress lines say what a user needs; Ray Data's bars would interleave with them.
    DataContext.get_current().enable_progress_bars = False
