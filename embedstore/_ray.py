"""Connecting to a Ray cluster, and checking that its nodes see the files a run needs.

Both Ray engines (:mod:`embedstore.ray_embed`, :mod:`embedstore.ray_predict`) start here.
Ray is an optional extra (``pip install 'embedstore[ray]'``); nothing else imports it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from embedstore.errors import BadInput, ClusterFailure, EmbedstoreError, MissingDependency

LOG = logging.getLogger(__name__)

REACH_TIMEOUT_S = 5.0


def ray_module(purpose: str) -> Any:
    """``ray`` (with Ray Data), or a one-line error naming the extra to install."""
    try:
        import ray
        import ray.data
    except ImportError as e:
        msg = f"ray is needed for {purpose}; pip install 'embedstore[ray]'"
        raise MissingDependency(msg) from e
    return ray


def _check_reachable(address: str) -> None:
    """Refuse an address whose head node does not answer, before Ray waits on it for minutes."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        msg = f"--address {address}: not a Ray address; pass host:port of the head node (`ray start --head` prints it)"
        raise BadInput(msg)
    try:
        with socket.create_connection((host, int(port)), timeout=REACH_TIMEOUT_S):
            pass
    except OSError as e:
        msg = (
            f"--address {address}: no Ray head node answers there ({e.strerror or e}); "
            "start one with `ray start --head` or check the address"
        )
        raise BadInput(msg) from None


def resolve_address(address: str | None) -> str | None:
    """The cluster to join: ``address``, else ``RAY_ADDRESS``, else None (start Ray on this machine)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def preflight(address: str | None, purpose: str) -> None:
    """Ray is installed and the head node at the address (if any) answers: checked in seconds."""
    ray = ray_module(purpose)
    address = resolve_address(address)
    if address and not ray.is_initialized():
        _check_reachable(address)


@contextlib.contextmanager
def session(address: str | None, purpose: str) -> Iterator[Any]:
    """Connect to the cluster at ``address`` (or ``RAY_ADDRESS``, or start Ray here); yield ``ray``.

    A session the caller opened already (``ray.init`` before the call) is used as it is and
    left open; one opened here is closed on exit.
    """
    ray = ray_module(purpose)
    if ray.is_initialized():
        yield ray
        return
    address = resolve_address(address)
    if address:
        _check_reachable(address)
    # Without an address Ray would join any cluster already running on this machine, which is not
    # what the user asked for (and its Ray Data actors were cancelled there): start a new one.
    ray.init(address=address or "local", log_to_driver=False, logging_level=logging.WARNING, include_dashboard=False)
    try:
        quiet_ray_data(ray)
        yield ray
    finally:
        ray.shutdown()


def quiet_ray_data(ray: Any) -> None:
    """embedstore shows its own progress: no Ray Data bars or start-of-run banners."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def alive_nodes(ray: Any) -> list[dict[str, Any]]:
    """The cluster's alive nodes (Ray's node records)."""
    return [n for n in ray.nodes() if n.get("Alive")]


def _file_facts(paths: list[str], token_file: str | None, token: str | None) -> list[str]:
    """Run on one node: what it cannot see (one line each; empty when all is well)."""
    problems = [f"{p}: not found" for p in paths if not Path(p).exists()]
    if token_file is not None:
        try:
            seen = Path(token_file).read_text()
        except OSError:
            seen = None
        if seen != token:
            problems.append(f"{Path(token_file).parent}: not the driver's folder (a check file it wrote is not there)")
    return problems


def check_store_filesystem(root: Path) -> None:
    """Check on this machine what the store needs of its file system: atomic rename and ``flock``."""
    where = root / "_locks"
    where.mkdir(parents=True, exist_ok=True)
    probe = where / f".fs-check-{uuid.uuid4().hex}"
    tmp = probe.with_suffix(".tmp")
    try:
        tmp.write_text("x")
        tmp.replace(probe)
        if not probe.is_file() or tmp.exists():
            msg = f"{root}: rename within a folder is not atomic on this file system; put the store on one where it is"
            raise BadInput(msg)
        with probe.open("a") as one, probe.open("a") as two:
            fcntl.flock(one, fcntl.LOCK_EX)
            try:
                fcntl.flock(two, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            msg = (
                f"{root}: flock does not exclude a second holder on this file system (an NFS mount with local_lock?); "
                "mount it with working locks or put the store elsewhere"
            )
            raise BadInput(msg)
    except OSError as e:
        msg = f"{root}: the store's file system refused {e.strerror or e} while checking rename and flock; use another folder"
        raise BadInput(msg) from None
    finally:
        tmp.unlink(missing_ok=True)
        probe.unlink(missing_ok=True)


def check_nodes_see(ray: Any, paths: Iterable[str | Path], what: str, shared_dir: Path | None = None) -> None:
    """Check that every alive node sees ``paths``, and ``shared_dir`` as the same folder as this process.

    ``shared_dir`` is checked with a file written here and read there (a folder of the same name
    on a node's local disk fails). One line naming the node and the first failed check.
    """
    paths = sorted({str(Path(p).resolve()) for p in paths})
    token = uuid.uuid4().hex
    token_file = None
    if shared_dir is not None:
        token_file = Path(shared_dir) / f".embedstore-node-check-{token}"
        token_file.write_text(token)
    try:
        facts = ray.remote(num_cpus=0)(_file_facts)
        strategy = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy
        nodes = alive_nodes(ray)
        refs = [
            facts.options(scheduling_strategy=strategy(n["NodeID"], soft=False)).remote(
                paths, str(token_file) if token_file else None, token
            )
            for n in nodes
        ]
        for node, problems in zip(nodes, ray.get(refs), strict=True):
            if problems:
                msg = (
                    f"node {node.get('NodeManagerAddress')}: {problems[0]}; {what} must be on a file system "
                    "every node mounts at the same path (NFS, Lustre)"
                )
                raise BadInput(msg)
    finally:
        if token_file is not None:
            token_file.unlink(missing_ok=True)


def encoder_actors(ray: Any) -> tuple[int, dict[str, float], int]:
    """How many encoder actors to run, the resources of each, and torch threads per actor.

    One actor per GPU when the cluster has GPUs; otherwise one per node, holding all but one
    of the node's CPUs (the one left reads tiles).
    """
    nodes = alive_nodes(ray)
    gpus = sum(int(n["Resources"].get("GPU", 0)) for n in nodes)
    if gpus:
        return gpus, {"num_gpus": 1, "num_cpus": 1}, 1
    cpus = min(int(n["Resources"].get("CPU", 1)) for n in nodes)
    per_actor = max(1, cpus - 1)
    return len(nodes), {"num_cpus": per_actor}, per_actor


@contextlib.contextmanager
def cluster_errors(what_remains: str) -> Iterator[None]:
    """Errors from a Ray run as one line: an embedstore error raised on a worker as itself, others as
    :class:`~embedstore.errors.ClusterFailure` saying ``what_remains`` (e.g. what a rerun resumes).

    Errors raised here, not by Ray, pass unchanged.
    """
    try:
        yield
    except Exception as e:
        if not _from_ray(e):
            raise
        cause = _cause(e)
        if isinstance(cause, EmbedstoreError) and not _from_ray(cause):  # e.g. weights missing on a worker
            raise cause from None
        lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()] or [repr(cause)]
        msg = f"the Ray cluster failed ({type(cause).__name__}: {lines[-1]}); {what_remains}"
        raise ClusterFailure(msg) from e


def _from_ray(error: BaseException) -> bool:
    """Whether Ray raised (or wrapped) ``error``: ``RayTaskError(X)`` is also an ``X``, so look at the class."""
    return type(error).__module__.split(".")[0] == "ray"


def _cause(error: BaseException) -> BaseException:
    """The exception a Ray task raised, unwrapped from Ray's error types."""
    seen = set()
    while _from_ray(error) and id(error) not in seen:
        seen.add(id(error))
        inner = getattr(error, "cause", None) or error.__cause__
        if inner is None:
            break
        error = inner
    return error
