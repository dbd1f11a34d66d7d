"""The public surface is exactly what __all__ says, and every name resolves."""

import devmgr


def test_all_names_resolve() -> None:
    for name in devmgr.__all__:
        assert getattr(devmgr, name) is not None, name


def test_contract_names_present() -> None:
    required = {
        "monitored_queue",
        "MonitoredQueue",
        "ThreadMonitoredQueue",
        "ProcessMonitoredQueue",
        "DeviceSpec",
        "SocketSpec",
        "ManagerConfig",
        "load_config",
        "Manager",
        "Client",
        "AsyncClient",
        "DevmgrError",
        "ConfigError",
        "ControlError",
        "ManagerUnreachable",
    }
    assert required <= set(devmgr.__all__)


def test_exception_hierarchy() -> None:
    for exc in (devmgr.ConfigError, devmgr.ControlError, devmgr.ManagerUnreachable):
        assert issubclass(exc, devmgr.DevmgrError)


def test_unknown_attribute() -> None:
    try:
        devmgr.no_such_thing  # noqa: B018
    except AttributeError as exc:
        assert "no_such_thing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")
