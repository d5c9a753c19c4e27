"""What the integration tests share: a token of their own for Ray's token authentication (never
the user's ~/.ray/auth_token), loopback-only Ray, and a check of what a set of processes listens on."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket

import psutil

TOKEN = secrets.token_hex(32)
"""One token per test process: Ray's token loader keeps the first token it reads."""

RAY_ENV = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment with the test token and loopback settings, no RAY_ADDRESS."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    return env | RAY_ENV | extra


@contextlib.contextmanager
def token_auth():
    """Token authentication on with the test token and Ray on loopback, in this process and the
    Ray processes it starts."""
    saved = {k: os.environ.get(k) for k in (*RAY_ENV, "RAY_ADDRESS")}
    os.environ.update(RAY_ENV)
    os.environ.pop("RAY_ADDRESS", None)
    from ray._private.authentication.authentication_token_setup import _enable_token_auth
    from ray._raylet import AuthenticationTokenLoader

    from ray._private import ray_constants

    _enable_token_auth()  # Ray reads RAY_AUTH_MODE once; this makes it read it again
    AuthenticationTokenLoader.instance().reset_cache()
    loopback = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False  # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read at import
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = loopback
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        AuthenticationTokenLoader.instance().reset_cache()  # a later Ray in this process reads its own token


def process_tree(pids) -> list[psutil.Process]:
    out = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            p = psutil.Process(pid)
            out += [p, *p.children(recursive=True)]
    return out


def listening_beyond_loopback(procs) -> list[str]:
    """``pid name ip:port`` of every listening TCP socket of ``procs`` not bound to loopback."""
    found = []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            conns = p.net_connections(kind="tcp") if hasattr(p, "net_connections") else p.connections(kind="tcp")
            found += [f"{p.pid} {p.name()} {c.laddr.ip}:{c.laddr.port}" for c in conns
                      if c.status == psutil.CONN_LISTEN and c.laddr.ip not in LOOPBACK]
    return found


def listening_ports(procs) -> int:
    n = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            conns = p.net_connections(kind="tcp") if hasattr(p, "net_connections") else p.connections(kind="tcp")
            n += sum(c.status == psutil.CONN_LISTEN for c in conns)
    return n


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
