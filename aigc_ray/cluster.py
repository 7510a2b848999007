"""Connecting to Ray: the cluster in RAY_ADDRESS when set, else a local one started on demand."""

from __future__ import annotations

import logging
import os

from aigc_ray.errors import ConfigError


def start_ray(num_cpus: int | None = None, ray_logs: bool = False) -> None:
    """`ray.init` once. Honours RAY_ADDRESS like Ray itself; a local cluster keeps Ray's token
    authentication on (the token lives in ~/.ray/auth_token, where Ray's clients find it).

    `ray_logs` forwards every worker's output to this console as Ray does by default; off, our
    driver prints one line per logging interval and Ray's worker logs stay in the session's log
    folder (errors still reach the console through the exceptions they raise).
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    # Forked tokenizers with threads only slow each other down. A value already in this
    # environment wins: inside a Ray job it comes from the job's runtime_env, and Ray refuses a
    # driver runtime_env that sets the same variable again.
    env_vars = {name: value for name, value in {"TOKENIZERS_PARALLELISM": "false"}.items()
                if name not in os.environ}
    try:
        ray.init(address=address, num_cpus=None if address else num_cpus,
                 logging_level=logging.WARNING, configure_logging=True, log_to_driver=ray_logs,
                 runtime_env={"env_vars": env_vars} if env_vars else None)
    except ConnectionError as exc:
        if not address:
            raise  # starting a local cluster failed: not something the command line can fix
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"cannot reach the Ray cluster at RAY_ADDRESS={address}: {first[:200]}; "
                          "start it, or unset RAY_ADDRESS to run on a local Ray") from None
    from ray.data import DataContext
    from transformers.utils import logging as hf_logging

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # It warns that the bars are off, which is what we asked for.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()

    # Our own progress lines say what a user needs; Ray Data's bars would interleave with them.
    DataContext.get_current().enable_progress_bars = False
