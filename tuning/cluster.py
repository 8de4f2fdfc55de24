"""Connecting to Ray, and running on a Ray cluster: where results go must suit several
machines.

`start_ray(address)` joins a cluster, or starts a Ray of the search's own that listens on
127.0.0.1 only, and keeps Ray's token file private.

`tuning.tuner.run` calls `check_cluster(space)` right after connecting to Ray, before any
trial starts. On one node every path is shared, so nothing is checked. With more than
one alive node:

- `search.storage_path` must be a place every node reaches at the same name: a URI
  (s3://, gs://, ...) or a folder on a network filesystem mounted at the same path on
  every node. A trial writes its checkpoints from the node it runs on, and a trial
  retried or resumed elsewhere reads them back; with a local folder Ray itself only fails
  at the first checkpoint of a trial on another node, minutes in, once per trial.
- `search.tracking_uri` must be a tracking server or database (http://HOST:5000,
  postgresql://...), not a SQLite file or file store. Only the driver writes MLflow
  (tuning.tracking), but on a cluster the driver runs on the head node (`ray job submit`,
  KubeRay, the cluster launcher), often in a temporary folder or a container: a file
  there is out of the user's reach and goes away with the head.

Both problems come as ONE ConfigError naming each setting, its value and what to use
instead. The check sees only what the driver's machine shows (/proc/mounts): for a shared
path it cannot recognise (a bind mount of a network share, a cluster of containers
sharing one host disk) set FAEREC_SHARED_STORAGE=1, which skips it for both settings.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from model.errors import ConfigError

SHARED_STORAGE_ENV = "FAEREC_SHARED_STORAGE"
LAPTOP_MODE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # Ray's switch: node address = 127.0.0.1

# Filesystem types whose files other machines see too; any FUSE mount (fuse.sshfs,
# fuse.gcsfuse, fuse.juicefs, ...) is taken as one.
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph",
    "glusterfs", "afs", "panfs", "wekafs"})

STORAGE_ADVICE = ("use a URI every node reaches (e.g. --storage-path s3://BUCKET/faerec or "
                  "gs://BUCKET/faerec) or a folder on a shared filesystem (NFS, Lustre, ...) "
                  "mounted at the same path on every node")
TRACKING_ADVICE = ("use an MLflow tracking server: start `bash mlflow/server.sh` on a host "
                   "every node reaches (HOST=0.0.0.0, behind a firewall: it has no "
                   "authentication) and pass --tracking-uri http://HOST:5000, or a database "
                   "URI such as postgresql://USER@DBHOST/mlflow")


@dataclass(frozen=True)
class Mount:
    point: str    # where it is mounted
    fstype: str   # as /proc/mounts names it: ext4, nfs4, fuse.sshfs, ...

    @property
    def shared(self) -> bool:
        return self.fstype in NETWORK_FILESYSTEMS or self.fstype.startswith("fuse.")


def _unescape(field: str) -> str:
    """/proc/mounts writes a space in a path as \\040 (octal escapes)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mounts(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            mounts.append(Mount(_unescape(fields[1]), fields[2]))
    return mounts


def read_mounts(path: str = "/proc/mounts") -> list[Mount]:
    try:
        return parse_mounts(Path(path).read_text())
    except OSError:  # not Linux: nothing is recognised as shared; the escape hatch remains
        return []


def mount_of(path: str, mounts: list[Mount]) -> Mount | None:
    """The mount holding `path` (which need not exist yet): the longest mount point above
    it; of several mounts on one point, the last (it hides the earlier ones)."""
    target = str(Path(path).expanduser().resolve())
    best = None
    for m in mounts:
        point = m.point.rstrip("/") or "/"
        if (target == point or target.startswith(point + "/") or point == "/") and (
                best is None or len(point) >= len(best.point.rstrip("/") or "/")):
            best = m
    return best


def _is_uri(value: str) -> bool:
    return "://" in value


def storage_problem(storage_path: str, mounts: list[Mount]) -> str | None:
    """Why `storage_path` cannot serve several nodes, or None."""
    if _is_uri(storage_path):
        scheme = urlparse(storage_path).scheme.lower()
        if scheme != "file":
            return None
        storage_path = urlparse(storage_path).path
    mount = mount_of(storage_path, mounts)
    if mount is not None and mount.shared:
        return None
    where = f" (a {mount.fstype} filesystem mounted at {mount.point})" if mount else ""
    return (f"search.storage_path = {storage_path} is a folder on this machine's own disk"
            f"{where}: trials on other nodes would write their checkpoints to their own "
            f"disks, where a retried or resumed trial cannot read them; {STORAGE_ADVICE}")


def tracking_file(tracking_uri: str) -> str | None:
    """The file or folder of a file-based MLflow store (sqlite:///, file:, a plain path),
    or None for a server or database."""
    if tracking_uri.startswith("sqlite:"):
        return tracking_uri[len("sqlite:///"):] or tracking_uri
    if tracking_uri.startswith("databricks") or tracking_uri.startswith("uc:"):
        return None
    parsed = urlparse(tracking_uri)
    if parsed.scheme in ("", "file"):
        return parsed.path or tracking_uri
    return None


def tracking_problem(tracking_uri: str) -> str | None:
    """Why `tracking_uri` does not suit a cluster, or None."""
    if tracking_file(tracking_uri) is None:
        return None
    return (f"search.tracking_uri = {tracking_uri} is a file store on the node the driver "
            f"runs on (the head node with ray job submit, KubeRay or the cluster launcher, "
            f"often a temporary folder or container): out of your reach there and lost with "
            f"the head; {TRACKING_ADVICE}")


def check_shared(storage_path: str, tracking_uri: str, nodes: int,
                 mounts: list[Mount] | None = None,
                 environ: dict[str, str] | None = None) -> None:
    """Raise one ConfigError naming every setting that does not suit `nodes` alive nodes."""
    environ = os.environ if environ is None else environ
    if nodes <= 1 or environ.get(SHARED_STORAGE_ENV, "") not in ("", "0"):
        return
    mounts = read_mounts() if mounts is None else mounts
    problems = [p for p in (storage_problem(storage_path, mounts),
                            tracking_problem(tracking_uri)) if p]
    if problems:
        raise ConfigError(
            f"the Ray cluster has {nodes} alive nodes, but results would stay on one "
            f"machine:\n  - " + "\n  - ".join(problems) +
            f"\nIf these paths are in fact shared by every node and kept after the job "
            f"(a share this check cannot see in /proc/mounts), set {SHARED_STORAGE_ENV}=1.")


def alive_nodes() -> int:
    """Alive nodes of the Ray cluster this process is connected to."""
    import ray
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def check_cluster(space) -> None:
    """The check for a connected Ray session and a loaded `tuning.space.SearchSpace`."""
    check_shared(space.search.storage_path, space.search.tracking_uri, alive_nodes())


@contextlib.contextmanager
def _loopback_only():
    """Ray binds its servers (GCS, raylet, object manager, workers, agents) to the node's IP
    address. In Ray's laptop mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) that address is
    127.0.0.1, so nothing listens beyond loopback. Ray reads the variable when imported
    (this process) and from the environment (the processes it starts); both are restored
    afterwards, so a later connection to a real cluster advertises a reachable address."""
    from ray._private import ray_constants  # where Ray keeps what it read at import

    saved_env = os.environ.get(LAPTOP_MODE)
    saved_constant = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LAPTOP_MODE], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_constant
        if saved_env is None:
            os.environ.pop(LAPTOP_MODE, None)
        else:
            os.environ[LAPTOP_MODE] = saved_env


def start_ray(address: str | None) -> None:
    """Join the cluster at `address`, or start a Ray of this search's own that listens on
    loopback only ("local": never join a `ray start` cluster that happens to run here)."""
    import ray
    from ray.exceptions import AuthenticationError

    if address is not None:
        try:
            ray.init(address=address, include_dashboard=False, configure_logging=False)
        except (ConnectionError, AuthenticationError) as e:  # e.g. a head with a token we lack
            raise ConfigError(f"--address {address}: Ray could not join the cluster: {e}") from None
    else:
        with _loopback_only():
            ray.init(address="local", include_dashboard=False, configure_logging=False)
    # Ray 2.60 writes its token (~/.ray/auth_token) readable by everyone on the machine;
    # whoever reads it can run code on the cluster.
    token = Path.home() / ".ray" / "auth_token"
    if token.is_file() and token.stat().st_uid == os.getuid() and token.stat().st_mode & 0o077:
        token.chmod(0o600)
