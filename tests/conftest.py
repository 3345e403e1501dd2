# Copyright 2025 The hf-dgm Authors. Licensed under the Apache License, Version 2.0.
"""Suite-wide test setup: no network but loopback, a private HF home, and a loopback Hub.

huggingface_hub, transformers and datasets read `HF_ENDPOINT`, `HF_HOME` and their other settings when they
are imported, so everything here that sets the environment runs at import time of this file, before any test
module imports them.
"""

import atexit
import contextlib
import ipaddress
import itertools
import os
import shutil
import socket
import sys
import tempfile
import uuid


TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)

# ----------------------------------------------------------------------------------------------------------
# 1. Environment, before huggingface_hub / transformers / datasets are imported
# ----------------------------------------------------------------------------------------------------------

HUB_TOKEN = "hf_test_token"
# The Hub port is chosen now (bound, not listening: nothing answers until the `hub_server` fixture starts).
_hub_socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
_hub_socket.bind(("127.0.0.1", 0))
HUB_ENDPOINT = f"http://127.0.0.1:{_hub_socket.getsockname()[1]}"

_hf_home = tempfile.mkdtemp(prefix="hf-dgm-tests-hf-home-")
atexit.register(shutil.rmtree, _hf_home, ignore_errors=True)

HUB_ENV = {
    "HF_ENDPOINT": HUB_ENDPOINT,
    "HF_TOKEN": HUB_TOKEN,
    "HF_HOME": _hf_home,  # fresh caches; the user's token and downloads are never touched
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_XET": "1",  # the test Hub speaks git LFS, not Xet
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "0",
    "HF_UPDATE_DOWNLOAD_COUNTS": "0",  # datasets would ping an S3 bucket on every load_dataset
    "DO_NOT_TRACK": "1",
}
os.environ.update(HUB_ENV)
# Offline flags would also block the loopback Hub; the socket guard below is what keeps the suite offline.
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.pop(_name, None)


def _point_libraries_at_the_test_hub():
    """Patches endpoint constants that a library resolved before this file ran (e.g. imported by a plugin)."""
    if "huggingface_hub" in sys.modules:
        from huggingface_hub import constants

        constants.ENDPOINT = HUB_ENDPOINT
        constants.HUGGINGFACE_CO_URL_TEMPLATE = HUB_ENDPOINT + "/{repo_id}/resolve/{revision}/{filename}"
        constants.HF_HUB_OFFLINE = False
        constants.HF_HUB_DISABLE_XET = True
    if "datasets" in sys.modules:
        import datasets.config

        datasets.config.HF_ENDPOINT = HUB_ENDPOINT
        datasets.config.HUB_DATASETS_URL = HUB_ENDPOINT + "/datasets/{repo_id}/resolve/{revision}/{path}"
        datasets.config.HF_HUB_OFFLINE = False


_point_libraries_at_the_test_hub()


# ----------------------------------------------------------------------------------------------------------
# 2. Socket guard: any connection to, or name lookup of, something that is not loopback fails the test
# ----------------------------------------------------------------------------------------------------------


class NetworkAccessBlocked(RuntimeError):
    """Raised when a test tries to reach a host other than loopback. Not an OSError on purpose: client
    libraries treat OSError as "offline" and fall back silently; this one surfaces."""


_blocked_attempts: list[str] = []
_expected_blocks = 0
_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback", ""}


def _is_loopback_host(host) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode()
    host = str(host).strip("[]").split("%")[0]
    if host.lower() in _LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _block(what: str):
    _blocked_attempts.append(what)
    raise NetworkAccessBlocked(
        f"Tests may only use loopback; blocked {what}. Start a loopback server in the test instead "
        "(see tests/hub_server.py and the `hub_server` fixture)."
    )


def _check_address(family, address, what):
    if family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple):
        if not _is_loopback_host(address[0]):
            _block(f"{what} to {address[0]}:{address[1] if len(address) > 1 else ''}")


_original_connect = socket.socket.connect
_original_connect_ex = socket.socket.connect_ex
_original_sendto = socket.socket.sendto
_original_create_connection = socket.create_connection
_original_getaddrinfo = socket.getaddrinfo


def _guarded_connect(self, address):
    _check_address(self.family, address, "connect")
    return _original_connect(self, address)


def _guarded_connect_ex(self, address):
    _check_address(self.family, address, "connect_ex")
    return _original_connect_ex(self, address)


def _guarded_sendto(self, data, *args):
    address = args[-1]
    _check_address(self.family, address, "sendto")
    return _original_sendto(self, data, *args)


def _guarded_create_connection(address, *args, **kwargs):
    if not _is_loopback_host(address[0]):
        _block(f"create_connection to {address[0]}:{address[1]}")
    return _original_create_connection(address, *args, **kwargs)


def _guarded_getaddrinfo(host, *args, **kwargs):
    if not _is_loopback_host(host):
        _block(f"name lookup of {host!r}")
    return _original_getaddrinfo(host, *args, **kwargs)


socket.socket.connect = _guarded_connect
socket.socket.connect_ex = _guarded_connect_ex
socket.socket.sendto = _guarded_sendto
socket.create_connection = _guarded_create_connection
socket.getaddrinfo = _guarded_getaddrinfo


@contextlib.contextmanager
def expect_network_block():
    """For tests of the guard itself: blocked attempts inside this block do not fail the test."""
    global _expected_blocks
    before = len(_blocked_attempts)
    try:
        yield
    finally:
        _expected_blocks += len(_blocked_attempts) - before


# ----------------------------------------------------------------------------------------------------------
# 3. Fixtures
# ----------------------------------------------------------------------------------------------------------

import pytest  # noqa: E402


def pytest_configure(config):
    # huggingface_hub's LFS upload passes raw bytes as `data=`, which its HTTP library deprecates: not ours to fix.
    config.addinivalue_line("filterwarnings", "ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")


@pytest.fixture(autouse=True)
def _fail_on_swallowed_network_access():
    """Fails a test that tried to leave loopback even when a library caught the guard's exception."""
    global _expected_blocks
    before, _expected_blocks = len(_blocked_attempts), 0
    yield
    unexpected = len(_blocked_attempts) - before - _expected_blocks
    if unexpected > 0:
        pytest.fail(f"The test tried to reach the network: {_blocked_attempts[before:]}", pytrace=False)


class HubFixture:
    """What a test needs to use the loopback Hub: its `endpoint`, a valid `token`, unique repo ids, the
    `server` (for its state and `server.uploads("regular" | "lfs" | "auto")`) and `subprocess_env()`."""

    def __init__(self, server):
        self.server = server
        self.endpoint = server.endpoint
        self.token = server.token
        self.user = server.user
        self._counter = itertools.count()

    def repo_id(self, prefix: str = "repo") -> str:
        return f"{self.user}/{prefix}-{next(self._counter)}-{uuid.uuid4().hex[:8]}"

    def subprocess_env(self, **overrides) -> dict:
        """The environment for a child process that must talk to this Hub (and only to it)."""
        env = {**os.environ, **HUB_ENV}
        for key, value in overrides.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env


@pytest.fixture(scope="session")
def hub_server():
    """A Hub-compatible server on 127.0.0.1 (the port in HF_ENDPOINT), for the whole session."""
    import datasets.config

    from hub_server import HubServer

    _point_libraries_at_the_test_hub()
    # load_dataset(repo_id) asks the Hub's dataset viewer (datasets-server.<endpoint host>) for a parquet export;
    # the test Hub has no viewer, and that name is not loopback.
    datasets.config.USE_PARQUET_EXPORT = False
    server = HubServer(sock=_hub_socket, token=HUB_TOKEN).start()
    assert server.endpoint == HUB_ENDPOINT
    yield HubFixture(server)
    server.stop()
