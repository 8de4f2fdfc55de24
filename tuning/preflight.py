"""Checks of what a search space cannot say about itself: the machine, the cluster, the
stores. `run_search.py` runs them after the space is validated and before Ray starts,
any MLflow run is created or any results folder is made, so a wrong URI, path, address
or device is one message in about a second, not a traceback after the data has loaded
(or a driver waiting forever for an address that never answers).

    preflight(space, resume=False, address=None)   # raises ConfigError
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from model.errors import ConfigError
from model.files import writable_problem
from model.urls import mask_url

# MLflow's stores: file (a path or file:), SQLAlchemy databases, a tracking server,
# Databricks. A +driver suffix (postgresql+psycopg2) names the database's Python driver.
TRACKING_SCHEMES = ("", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https",
                    "databricks", "databricks-uc", "uc")
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
CONNECT_TIMEOUT_S = 5.0  # a Ray address that does not answer in this time is reported


def check_tracking_uri(uri: str) -> None:
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    shown = f"search.tracking_uri = {mask_url(uri)}"
    if len(scheme) == 1:  # a Windows drive letter, C:\mlruns: a path
        scheme = ""
    if scheme.split("+")[0] not in TRACKING_SCHEMES:
        raise ConfigError(f"{shown}: MLflow cannot use {scheme}:// URIs; use "
                          "sqlite:///PATH.db (the default), a folder, http(s)://HOST:PORT "
                          "(bash mlflow/server.sh) or a database (postgresql://, mysql://)")
    if scheme in ("http", "https") and not parts.hostname:
        raise ConfigError(f"{shown}: no host; expected http(s)://HOST:PORT")
    if scheme.split("+")[0] in DATABASE_SCHEMES:
        _check_database(uri, shown)
    if scheme in ("", "file", "sqlite"):
        store = Path(uri[len("sqlite:///"):] if scheme == "sqlite" else parts.path or uri)
        folder = store.parent if scheme == "sqlite" else store
        problem = writable_problem(folder)
        if problem:
            raise ConfigError(f"{shown}: MLflow could not write its store there: {problem}")


def _check_database(uri: str, shown: str) -> None:
    """A database URI must parse and its driver be installed (else MLflow fails later)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        make_url(uri).get_dialect().import_dbapi()
    except NoSuchModuleError as e:  # before ArgumentError, its base class
        raise ConfigError(f"{shown}: unknown database driver ({e})") from None
    except (ArgumentError, ValueError) as e:
        raise ConfigError(f"{shown}: not a database URL ({e})") from None
    except ImportError as e:
        raise ConfigError(f"{shown}: the database's Python driver is not installed "
                          f"({e.name or e}); install it (e.g. psycopg2-binary for "
                          "postgresql, pymysql for mysql+pymysql)") from None


def check_storage_path(path: str) -> None:
    if "://" in path and not path.startswith("file://"):
        return  # s3://, gs://...: Ray's filesystem layer reports those
    local = path[len("file://"):] if path.startswith("file://") else path
    problem = writable_problem(local)
    if problem:
        raise ConfigError(f"search.storage_path = {path}: Ray Tune could not write results "
                          f"and checkpoints there: {problem}")


def _resolve_address(address: str) -> str:
    """auto -> the address of the cluster `ray start` left on this machine (as Ray finds it)."""
    if address != "auto":
        return address
    from ray._private.services import find_bootstrap_address  # Ray's own lookup for "auto"

    found = os.environ.get("RAY_ADDRESS") or find_bootstrap_address(None)
    if not found:
        raise ConfigError("--address auto: no running Ray cluster found on this machine (no "
                          "RAY_ADDRESS, no `ray start` session); start one with "
                          "`ray start --head`, give --address HOST:PORT, or leave --address "
                          "out for a search on this machine alone")
    return found


def check_address(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> str:
    """The address to give ray.init: its GCS must accept a TCP connection within
    `timeout_s` (Ray itself retries an unreachable address for minutes). `auto` is
    resolved here, to the cluster `ray start` left (Ray's own fallback would join any Ray
    instance running on the machine, another user's local one included)."""
    target = _resolve_address(address)
    host_port = target.split("://", 1)[-1]
    host, sep, port = host_port.rpartition(":")
    shown = f"--address {address}" + (f" ({target})" if target != address else "")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"{shown}: expected auto or HOST:PORT (the head's GCS port, "
                          "6379 by default)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except socket.timeout:
        raise ConfigError(f"{shown}: no answer within {timeout_s:g} s; is the Ray head "
                          "running and the port open from here?") from None
    except OSError as e:
        raise ConfigError(f"{shown}: cannot connect ({e.strerror or e}); is the Ray head "
                          "running (`ray status` on it) and the port open from here?") from None
    if os.environ.get("RAY_USE_TLS", "0").lower() not in ("1", "true"):
        _check_grpc(f"{host}:{port}", shown, timeout_s)
    return target


def _check_grpc(host_port: str, shown: str, timeout_s: float) -> None:
    """A Ray head's GCS speaks gRPC; on any other listening port ray.init retries for
    minutes. The gRPC handshake alone (no call, no token needed) tells them apart."""
    import grpc

    channel = grpc.insecure_channel(host_port)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
    except grpc.FutureTimeoutError:
        raise ConfigError(f"{shown}: something listens there, but it is not a Ray head (no "
                          f"gRPC handshake within {timeout_s:g} s); give the head's GCS port "
                          "(6379 by default; `ray status` on the head shows the address)") from None
    finally:
        channel.close()


def check_gpus(space, address: str | None) -> None:
    """On this machine alone, GPUs asked per trial must exist, or Ray waits forever."""
    gpu = space.search.gpu
    if address is not None or gpu == 0:
        return  # a cluster's nodes are its own business (and may be added later)
    import torch

    have = torch.cuda.device_count()
    if have < math.ceil(gpu):
        raise ConfigError(f"{space.label}: search.resources.gpu = {gpu:g}, but this machine "
                          f"has {have} GPU{'s' if have != 1 else ''} (torch sees "
                          f"{have}); no trial could ever start. Use gpu: 0, or --address "
                          "to run on a cluster with GPUs")


def check_resume(space) -> None:
    """--resume needs a search of that name: Tune's state (tuner.pkl) or the search's own
    record (tracking.json) in its folder."""
    storage = space.search.storage_path
    if "://" in storage:
        return  # remote storage: Tune.can_restore checks it once connected
    folder = Path(storage) / space.name
    if not any((folder / name).exists() for name in ("tuner.pkl", "tracking.json")):
        raise ConfigError(f"--resume: no search named {space.name!r} under {storage} "
                          f"({folder} holds no saved search); leave out --resume to start it")


def preflight(space, resume: bool = False, address: str | None = None) -> str | None:
    """Every check above; the first problem is raised as a ConfigError. Returns the Ray
    address to connect to (None: a Ray of this search's own on this machine)."""
    check_tracking_uri(space.search.tracking_uri)
    check_storage_path(space.search.storage_path)
    check_gpus(space, address)
    if resume:
        check_resume(space)
    return None if address is None else check_address(address)
