"""devmgr: a supervised multi-device process manager for ZeroMQ devices.

The public names below are imported lazily (PEP 562), so that `devmgr status` does not
pay for pydantic or the manager when it only sends one request.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
from typing import TYPE_CHECKING, Any

from devmgr._errors import (
    ConfigError,
    ControlError,
    DeviceStartError,
    DevmgrError,
    ManagerUnreachable,
)
from devmgr._version import __version__


def _core_is_built() -> bool:
    # Checked without loading it: loading the core imports pyzmq, which `devmgr status`
    # should not pay for; and without importlib.util, which costs the CLI ~5 ms.
    folder = os.path.dirname(__file__)
    return any(
        os.path.exists(os.path.join(folder, "_core" + suffix))
        for suffix in importlib.machinery.EXTENSION_SUFFIXES
    )


if not _core_is_built():  # pragma: no cover - unbuilt checkout
    raise ImportError(
        "devmgr's native core (devmgr._core) is not built. Build it with "
        "`pip install -e .` (or `pip install .`) from the project folder, or "
        "`python setup.py build_ext --inplace`; gcc and the Python headers are needed."
    )

if TYPE_CHECKING:
    from devmgr._aclient import AsyncClient
    from devmgr._client import Client
    from devmgr._config import load_config
    from devmgr._devices import (
        Device,
        MonitoredQueue,
        ProcessDevice,
        ProcessMonitoredQueue,
        ThreadDevice,
        ThreadMonitoredQueue,
        monitored_queue,
        seed_routing_ids,
    )
    from devmgr._manager import Manager
    from devmgr._spec import (
        CurveSpec,
        DeviceSpec,
        HealthSpec,
        ManagerConfig,
        ManagerSettings,
        RestartSpec,
        SocketSpec,
    )

_LAZY: dict[str, str] = {
    "monitored_queue": "devmgr._devices",
    "MonitoredQueue": "devmgr._devices",
    "ThreadMonitoredQueue": "devmgr._devices",
    "ProcessMonitoredQueue": "devmgr._devices",
    "Device": "devmgr._devices",
    "ThreadDevice": "devmgr._devices",
    "ProcessDevice": "devmgr._devices",
    "seed_routing_ids": "devmgr._devices",
    "DeviceSpec": "devmgr._spec",
    "SocketSpec": "devmgr._spec",
    "RestartSpec": "devmgr._spec",
    "HealthSpec": "devmgr._spec",
    "CurveSpec": "devmgr._spec",
    "ManagerSettings": "devmgr._spec",
    "ManagerConfig": "devmgr._spec",
    "load_config": "devmgr._config",
    "Manager": "devmgr._manager",
    "Client": "devmgr._client",
    "AsyncClient": "devmgr._aclient",
}

__all__ = [
    "AsyncClient",
    "Client",
    "ConfigError",
    "ControlError",
    "CurveSpec",
    "Device",
    "DeviceSpec",
    "DeviceStartError",
    "DevmgrError",
    "HealthSpec",
    "Manager",
    "ManagerConfig",
    "ManagerSettings",
    "ManagerUnreachable",
    "MonitoredQueue",
    "ProcessDevice",
    "ProcessMonitoredQueue",
    "RestartSpec",
    "SocketSpec",
    "ThreadDevice",
    "ThreadMonitoredQueue",
    "__version__",
    "load_config",
    "monitored_queue",
    "seed_routing_ids",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'devmgr' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
