"""The environment of the Python processes tests start (``test_parallel.py``, ``test_train.py``)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def subprocess_env(
    device_count: int | None = None, *, isolate: bool = False, **extra: str
) -> dict[str, str]:
    """This process's environment for a child Python, with ``XLA_FLAGS`` free of a device count.

    The arithmetic flags in ``XLA_FLAGS`` (``--xla_cpu_max_isa=…``) are kept: a run under a
    restricted instruction set runs its children under it too, and jax.random's float32
    arithmetic (the initial params a child draws) depends on the instruction set XLA targets.
    ``--xla_force_host_platform_device_count`` is dropped, and set to ``device_count`` if given.

    Args:
      device_count: the number of host devices the child gets (``None``: XLA's default, or what
        the child sets itself).
      isolate: also drop this process's other ``XLA_*`` and ``JAX_*`` settings and pin
        ``JAX_PLATFORMS=cpu`` (for workers that set their own); ``False`` keeps them, so the
        child draws the same random numbers as this process.
      **extra: variables to set last.

    Returns:
      The environment, with the repository root on ``PYTHONPATH`` so the child imports this
      checkout's ``bpjax`` and ``tests``.
    """
    if isolate:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    else:
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    if device_count is not None:
        flags.append(f"--xla_force_host_platform_device_count={device_count}")
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    if isolate:
        env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env
