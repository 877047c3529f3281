"""What every job needs before work starts: a Ray runtime and one-line usage errors."""

from __future__ import annotations

import os
import socket

import ray


class UsageError(ValueError):
    """A user's mistake: printed as one line naming the value and the fix, exit status 2."""


class SweepInterrupted(Exception):
    """The sweep stopped short (Ctrl-C, or MLflow lost at the end); `--resume NAME` finishes it."""

    def __init__(self, message: str, exit_code: int = 130):  # 130: the shell's code for Ctrl-C
        super().__init__(message)
        self.exit_code = exit_code


# No usage reports from Ray or MLflow: a sweep talks only to its own cluster and tracking store.
TELEMETRY_OPT_OUT = {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


def opt_out_of_telemetry() -> None:
    """TELEMETRY_OPT_OUT in this process's environment (a user's own setting wins)."""
    for name, value in TELEMETRY_OPT_OUT.items():
        os.environ.setdefault(name, value)


def connect_ray(num_cpus: int | None = None) -> dict:
    """Join $RAY_ADDRESS if set, else start Ray in this process bound to loopback.

    Returns the cluster's resources. An in-process Ray started here generates and
    uses its own authentication token (Ray 2.60's default for local clusters).
    """
    opt_out_of_telemetry()
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            if check_ray_address(address) in LOOPBACK_HOSTS:
                keep_ray_on_loopback()  # else Ray swaps 127.0.0.1 for this machine's routable address
            try:
                ray.init(address=address, log_to_driver=True)
            except ConnectionError as error:  # something answers there, but not a Ray cluster's GCS
                raise UsageError(f"no Ray cluster answers at RAY_ADDRESS={address} ({error}): check the "
                                 "address, or unset RAY_ADDRESS to run Ray in this process") from None
        else:
            # Ray Train frees a stopped trial's workers through the state API, which the
            # dashboard serves: without it, trials that ASHA stops keep their CPUs forever.
            # Naming its address lets Ray's processes find *this* Ray when others run too.
            dashboard_port = free_port()
            os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
            keep_ray_on_loopback()
            ray.init(
                num_cpus=num_cpus,
                # Never listen on or advertise a public interface for a laptop run.
                _node_ip_address="127.0.0.1",
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                dashboard_port=dashboard_port,
                configure_logging=False,
            )
    return ray.cluster_resources()


LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
# HTTP/2's client preface and an empty SETTINGS frame (RFC 9113, section 3.4).
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def check_ray_address(address: str, timeout: float = 5) -> str | None:
    """Refuse within seconds a RAY_ADDRESS that nothing answers at (ray.init retries it for minutes).

    Returns the address's host (None for in-process Ray or "auto").
    """
    if address in ("", "auto"):
        return None  # in-process Ray, or Ray reads the address of the cluster started on this machine itself
    if address.startswith(("http://", "https://")):
        raise UsageError(f"RAY_ADDRESS={address} is a dashboard (Jobs API) address: submit with "
                         "lenet-tune submit -- tune ..., set RAY_ADDRESS to the cluster's HOST:PORT (GCS), "
                         "or unset RAY_ADDRESS to run Ray in this process")
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"RAY_ADDRESS={address} is not HOST:PORT: set it to the cluster's address, "
                         "e.g. 127.0.0.1:6379, or unset RAY_ADDRESS to run Ray in this process")
    try:
        # Ray's GCS speaks gRPC: it answers HTTP/2's opening with a SETTINGS frame. A port that
        # accepts and stays silent would otherwise hold ray.init for minutes.
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as probe:  # [::1]:6379
            probe.sendall(HTTP2_PREFACE)
            answered = probe.recv(9)
        if len(answered) < 4 or answered[3] != 0x04:
            raise OSError("it does not speak gRPC")
    except OSError as error:
        raise UsageError(f"no Ray cluster answers at RAY_ADDRESS={address} ({error.strerror or error}): "
                         "start one (lenet-tune cluster up) or unset RAY_ADDRESS to run Ray in this process") from None
    return host


def keep_ray_on_loopback() -> None:
    """Make Ray advertise 127.0.0.1 instead of swapping it for the machine's routable address.

    Ray does that swap on Linux so that other nodes can join; a laptop cluster has
    no other nodes. This is the switch Ray itself uses on macOS and Windows; the
    environment variable carries it to the raylet and workers.
    """
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def max_concurrent_trials(cluster: dict, workers: int, cpus_per_worker: int, gpus_per_worker: float) -> int:
    """How many trials fit the cluster at once, so trials never oversubscribe cores or GPUs."""
    fits = int(cluster.get("CPU", 0) // (workers * cpus_per_worker))
    if gpus_per_worker:
        fits = min(fits, int(cluster.get("GPU", 0) // (workers * gpus_per_worker) + 1e-9))
    return fits


def check_fits(cluster: dict, workers: int, cpus_per_worker: int, gpus_per_worker: float) -> None:
    """Refuse up front a trial that could never be scheduled (it would wait forever)."""
    if gpus_per_worker and cluster.get("GPU", 0) < gpus_per_worker:
        raise UsageError(
            f"--gpus-per-worker {gpus_per_worker} but the Ray cluster has {cluster.get('GPU', 0):g} GPUs: "
            "use --gpus-per-worker 0 or a cluster with GPUs"
        )
    if max_concurrent_trials(cluster, workers, cpus_per_worker, gpus_per_worker) < 1:
        raise UsageError(
            f"a trial needs {workers} workers x {cpus_per_worker} CPUs"
            f"{f' x {gpus_per_worker} GPUs' if gpus_per_worker else ''} but the Ray cluster has "
            f"{cluster.get('CPU', 0):g} CPUs, {cluster.get('GPU', 0):g} GPUs: lower --workers-per-trial, "
            "--cpus-per-worker or --gpus-per-worker"
        )


def check_multinode(storage_path: str, tracking_uri: str, alive_nodes: int) -> None:
    """On a cluster of several nodes, refuse places that only one node can see.

    Ray Train writes checkpoints from whichever node a worker lands on, so the
    storage path must be shared (s3://, gs://, or a shared filesystem the user
    vouches for with LENET_SHARED_STORAGE=1). A SQLite or file MLflow store would
    strand the runs on the driver's node, out of reach of the UI and other jobs.
    """
    if alive_nodes <= 1:
        return
    if "://" not in storage_path and os.environ.get("LENET_SHARED_STORAGE") != "1":
        raise UsageError(
            f"storage path {storage_path} is local but the Ray cluster has {alive_nodes} nodes: "
            "use --storage-path s3://BUCKET/PATH or gs://..., or set LENET_SHARED_STORAGE=1 for a shared mount"
        )
    if tracking_uri.startswith(("sqlite:", "file:", "/")) or "://" not in tracking_uri:
        raise UsageError(
            f"MLflow URI {tracking_uri} is a local store but the Ray cluster has {alive_nodes} nodes: "
            "run an MLflow server (lenet-tune cluster up, or cluster/README.md) and pass --tracking-uri http://..."
        )
