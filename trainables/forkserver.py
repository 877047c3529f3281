"""One-worker trials train in processes forked from one per-node server that has imported torch.

A trial that imports torch itself pays 260-320 MB of private memory for it (torch's C++ operator
registry and Python modules, and 104 MB of CUDA libraries' data even on a CPU), so each extra
concurrent trial added about 395 MB. Here each node runs one `ForkServer` actor that imports torch
and the loop once; every one-worker trial trains in a child forked from it, which shares those pages
copy-on-write and writes only its own (17-27 MB after an epoch), so an extra concurrent trial now
adds about 140 MB (benchmarks/memory.py). The Tune trial stays a thin process (Ray and Tune, no
torch) that holds the trial's CPUs and GPU share, hands the child its job and relays the child's
epoch reports and checkpoints to Tune.

    Tune trial (thin; holds the CPUs/GPU) --start(job)--> ForkServer (one per node, 0 CPUs)
        ^  reports, checkpoints over a Unix socket            | fork()
        +------------------------------------------------ child: fit(); torch threads = the trial's CPUs

The child exits when its trial's process or the server goes away, and a trial that ends for any
reason kills its child, so no training outlives the trial that holds its CPUs.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import signal
import socket
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from multiprocessing.connection import Connection

import ray
from ray import tune

SERVER_PREFIX = "lenet-forkserver-"
CONNECT_TIMEOUT_S = 60  # from start() to the child's connection: a fork and a connect, normally milliseconds
WATCH_INTERVAL_S = 0.5  # how often a child checks that its trial and its server are still there
# A server with no child for this long ends itself: the sweep that started it normally stops it at its
# end, but a driver killed outright cannot, and on a long-lived cluster the server would stay forever.
IDLE_EXIT_S = 300


@ray.remote(num_cpus=0, max_concurrency=64)  # trials start and wait on it concurrently
class ForkServer:
    """The process per node that children fork from. It never runs a torch op: no thread pool or CUDA
    context exists to be inherited, so each child sets its own threads and device."""

    def __init__(self, idle_exit_s: float = IDLE_EXIT_S):
        # The point of this process: what every child runs, imported once and shared by them all.
        import torch  # noqa: F401
        import trainables.loop
        import trainables.trial  # noqa: F401

        self._exited: dict[int, threading.Event] = {}
        self._exit_codes: dict[int, int] = {}
        self._lock = threading.Lock()
        self._last_busy, self._closing = time.monotonic(), False
        threading.Thread(target=self._end_when_idle, args=(idle_exit_s,), daemon=True).start()
        # Objects made so far are never collected or moved: a child's garbage collector then has
        # no reason to write to (and so copy) the pages they sit on.
        gc.freeze()

    def start(self, job: dict, data_refs: list, entry: Callable | None = None) -> int:
        """Fork a child that runs `entry(job, splits, report)` (default: `train`); returns its pid."""
        with self._lock:
            if self._closing:
                raise RuntimeError("this fork server is ending (idle): start another")
            self._last_busy = time.monotonic()
        splits = ray.get(data_refs[0])  # read-only views of the object store: the child maps the same pages
        with warnings.catch_warnings():
            # Python 3.12 warns on fork() in a threaded process; the child touches nothing another
            # thread may have locked (no Ray, no logging) and leaves through os._exit.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:
            _child_main(job, splits, entry or train)  # never returns
        self._exited[pid] = threading.Event()
        # The reaper holds `splits`, and so keeps the object store's pages pinned, until the child exits.
        threading.Thread(target=self._reap, args=(pid, splits), daemon=True).start()
        return pid

    def _reap(self, pid: int, splits) -> None:
        _, status = os.waitpid(pid, 0)
        self._exit_codes[pid] = os.waitstatus_to_exitcode(status)
        with self._lock:
            self._last_busy = time.monotonic()
        self._exited[pid].set()

    def _end_when_idle(self, idle_exit_s: float) -> None:
        while True:
            time.sleep(min(idle_exit_s, 10))
            with self._lock:
                self._closing = not self.children() and time.monotonic() - self._last_busy > idle_exit_s
            if self._closing:
                ray.kill(ray.get_runtime_context().current_actor)
                return

    def children(self) -> list[int]:
        """The pids of the children still running."""
        return [pid for pid, exited in self._exited.items() if not exited.is_set()]

    def exit_code(self, pid: int, timeout: float) -> int | None:
        """The child's exit code (negative: killed by that signal), or None if it still runs after `timeout` s."""
        exited = self._exited.get(pid)
        return self._exit_codes[pid] if exited is not None and exited.wait(timeout) else None


def fork_server(node_id: str):
    """A node's ForkServer, started by whoever asks first: the sweep's driver (`start_fork_servers`),
    or the node's first trial on a node that joined later.

    Detached, because the trial that may start it ends long before the others that use it; named
    per node within the sweep's Ray namespace, and stopped by `stop_fork_servers` when the sweep ends.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return ForkServer.options(
        name=SERVER_PREFIX + node_id, get_if_exists=True, lifetime="detached",
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    ).remote()


def start_fork_servers() -> None:
    """Start a fork server on every live node with CPUs now, so that it imports torch while Tune starts
    the first trials rather than after (about a second of each first trial's start on 2 cores)."""
    for node in ray.nodes():
        if node["Alive"] and node["Resources"].get("CPU", 0) > 0:
            fork_server(node["NodeID"])


def stop_fork_servers() -> None:
    """End the fork servers that this Ray namespace's trials started (the driver calls it at the end)."""
    for name in ray.util.list_named_actors():
        if name.startswith(SERVER_PREFIX):
            with contextlib.suppress(ValueError):  # already gone
                ray.kill(ray.get_actor(name))


def run_trial_in_fork(job: dict, data_refs: list, entry: Callable | None = None) -> None:
    """The thin Tune trial: have this node's ForkServer fork the training, relay its reports to Tune.

    `job` holds plain values (the trial's config, the base hyperparameters, its CPUs and whether it
    has a GPU); this adds where to connect, the trial's GPU and the checkpoint to resume from.
    """
    with tempfile.TemporaryDirectory(prefix="lenet-trial-") as folder:  # mode 0700: only this user connects
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address = os.path.join(folder, "socket")
        listener.bind(address)
        listener.listen(1)
        checkpoint = tune.get_checkpoint()
        job = {**job, "address": address, "trial_pid": os.getpid(),
               # Ray picked this trial's GPU for this process; the child must use the same one.
               "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
               "resume_dir": checkpoint.to_directory(os.path.join(folder, "resume")) if checkpoint else None}
        server, pid = _start_child(job, data_refs, entry)
        finished = False
        try:
            listener.settimeout(CONNECT_TIMEOUT_S)
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                raise RuntimeError(f"training process {pid} never connected "
                                   f"(exit code {ray.get(server.exit_code.remote(pid, 0))})") from None
            sock.settimeout(None)
            with Connection(sock.detach()) as conn:
                _relay(conn, server, pid)
            finished = True  # the child said "done" and exits by itself
        finally:
            listener.close()
            if not finished:  # stopped or failed: the child must not keep the CPUs Tune hands on
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _start_child(job: dict, data_refs: list, entry: Callable | None, attempts: int = 5):
    """(this node's fork server, the pid of the child it forked for this trial)."""
    for attempt in itertools.count(1):
        server = fork_server(ray.get_runtime_context().get_node_id())
        try:
            return server, ray.get(server.start.remote(job, data_refs, entry))
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError):
            if attempt == attempts:
                raise
            time.sleep(1)  # it was ending (idle, or its sweep's end) as this trial came: the next call starts one


def _relay(conn: Connection, server, pid: int) -> None:
    while True:
        try:
            message = conn.recv()
        except EOFError:
            code = ray.get(server.exit_code.remote(pid, 10))
            raise RuntimeError(f"training process {pid} died (exit code {code}"
                               f"{', killed by the kernel for memory?' if code == -signal.SIGKILL else ''})") from None
        if message[0] == "report":
            _, metrics, checkpoint_dir = message
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)
            conn.send("stored")  # the checkpoint is in Tune's storage: the child may delete its folder
        elif message[0] == "error":
            raise RuntimeError(f"training failed in process {pid}:\n{message[1]}")
        else:  # "done"
            return


# ---------------------------------------------------------------- in the forked child


def train(job: dict, splits, report: Callable) -> None:
    """What a child runs by default: the trial's hyperparameters, trained by `fit`."""
    import torch

    from trainables.config import HyperParams
    from trainables.loop import fit, load_checkpoint
    from trainables.trial import trial_hparams

    if job["cuda_visible_devices"] is not None:  # read when CUDA starts, which is after this
        os.environ["CUDA_VISIBLE_DEVICES"] = job["cuda_visible_devices"]
    torch.set_num_threads(job["cpus"])  # threads = the CPUs Ray gave the trial
    hparams = trial_hparams(HyperParams(**job["base"]), job["config"])
    device = torch.device("cuda" if job["use_gpu"] else "cpu")
    resume_state = load_checkpoint(job["resume_dir"], device) if job["resume_dir"] else None
    fit(hparams, splits, device, report, resume_state)


def _child_main(job: dict, splits, entry: Callable) -> None:
    code = 1
    try:
        # Everything inherited stays uncollected: a Ray object finalised here would call into the
        # server's Ray core worker, whose threads did not come along with the fork.
        gc.freeze()
        server_pid = os.getppid()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(job["address"])
        conn = Connection(sock.detach())
        threading.Thread(target=_exit_when_orphaned, args=(job["trial_pid"], server_pid), daemon=True).start()

        def report(metrics: dict, checkpoint_dir: str | None) -> None:
            conn.send(("report", metrics, checkpoint_dir))
            conn.recv()  # wait until the trial has stored the checkpoint

        try:
            entry(job, splits, report)
            conn.send(("done",))
            code = 0
        except BaseException:
            conn.send(("error", traceback.format_exc()))
    finally:
        os._exit(code)  # no atexit handlers or finalizers of the server's Ray state


def _exit_when_orphaned(trial_pid: int, server_pid: int) -> None:
    while True:
        time.sleep(WATCH_INTERVAL_S)
        if os.getppid() != server_pid or not _alive(trial_pid):
            os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else (a recycled pid): treat as gone
        return False
    return True
