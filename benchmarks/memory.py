"""Issue 4, target 5: memory added by each extra concurrent trial (<= 300 MB), with any torch build.

Unlike benchmarks/run.py this imports no torchvision, so it also runs where a CPU-only torch
is installed without it. From the repository root, with the CIFAR-10 training JPEGs in
/tmp/cifar/train/<class>/ (about 1-2 minutes on 2 cores):

    PYTHONPATH=. python benchmarks/memory.py
    PYTHONPATH=. python benchmarks/memory.py --json /tmp/memory.json --label cuda-wheel
    PYTHONPATH=. python benchmarks/memory.py --compare /tmp/memory-*.json   # side by side, runs nothing

It starts Ray inside the process (jobs.runtime.connect_ray: loopback only, token auth) and measures:

(a) the floor: USS of a fresh Ray worker bare, after `import torch`, and after one epoch of
    `trainables.loop.fit` on the shared data (no Tune, Train or MLflow in the process);
(b) the product's real trial (`trainables.trial.trial_driver`, one-worker path, 1 epoch on the full
    data): peak memory summed over the trial's processes (the thin Tune trial, the node's fork
    server, the child it forks to train) and the object store's bytes in use, for 1 trial of 2 CPUs
    and then 2 concurrent trials of 1 CPU;
(c) extra_trial_anon_mb = (2x1 sum - 1x2 sum of anonymous memory, as proportional set size) +
    (2x1 object store - 1x2 object store), the figure target 5 bounds, beside the same on private
    dirty, USS and PSS, and where the training process's private memory lies, by mapping
    (/proc/PID/smaps: [heap], [anon], each library's file-backed pages and its .bss).

Anonymous memory (heap, anonymous mmaps, written library data) is what no process can share with
one that did not fork from it. Children forked from the fork server share the pages it wrote while
importing torch until they write them: such pages are in no process's private memory, and
PSS_Anon splits each among the processes that map it, so its sum over the trial processes is
exactly the anonymous memory they hold. USS (private dirty + private clean) misses those shared
pages and also counts library pages only one process has touched so far as its own, though they
are shared as soon as a second process maps the same files. The dataset's pages sit once in the
object store (shared memory), never in a trial's anonymous memory. Peaks are sampled every
0.5 s, so single runs differ by tens of MB: run it more than once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

MB = 1024**2
TARGET_EXTRA_TRIAL_MB = 300.0
# Libraries a CPU-only node never needs: the CUDA runtime and its maths libraries, torch's CUDA half, Triton.
CUDA_LIBRARY = re.compile(r"cuda|cublas|cudnn|cufft|curand|cusolver|cusparse|nccl|nvrtc|nvjitlink|nvshmem|"
                          r"cupti|cufile|nvtx|triton|libnvidia|libcaffe2_nvrtc", re.IGNORECASE)


# ---------------------------------------------------------------- private memory by mapping


def elf_load_end(path: str) -> int | None:
    """Where a shared library's last loadable segment ends in memory (p_vaddr + p_memsz), from its ELF header."""
    import struct

    try:
        with open(path, "rb") as elf:
            head = elf.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit ELF only
                return None
            phoff, = struct.unpack_from("<Q", head, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
            elf.seek(phoff)
            table = elf.read(phentsize * phnum)
    except OSError:
        return None
    ends = [vaddr + memsz for p_type, vaddr, memsz in
            (struct.unpack_from("<I12xQ16xQ", table, i * phentsize) for i in range(phnum)) if p_type == 1]
    return max(ends, default=None)


def private_memory_by_mapping(pid: int | str = "self") -> dict:
    """Private dirty and private clean kB of one process, grouped by what each mapping holds.

    Groups: "[heap]" (brk: malloc's main arena), "[anon]" (anonymous mmaps: other malloc arenas,
    large allocations, Python's arenas, thread stacks), "[stack]", "<library>" (its file-backed
    pages: relocated .data/.got, written pages) and "<library> .bss" (anonymous memory inside the
    library's own load range, past its file-backed pages: zero-initialised statics, as its ELF
    program headers place them). Memory that a library's static initialisers obtain from malloc
    lands in [heap]/[anon] and cannot be told apart here.
    """
    groups: dict[str, dict[str, int]] = defaultdict(lambda: {"private_dirty_kb": 0, "private_clean_kb": 0})
    paths: dict[str, str] = {}
    ranges: dict[str, int | None] = {}  # library path -> end of its load range in this process
    header = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ ([0-9a-f]+) \S+ \d+\s*(.*)$")
    name, previous_file = None, None
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            match = header.match(line)
            if match:
                start, end, offset, path = int(match[1], 16), int(match[2], 16), int(match[3], 16), match[4].strip()
                if not path:
                    limit = ranges.get(previous_file) if previous_file else None
                    # Only an anonymous mapping that lies wholly inside the library's load range is its .bss;
                    # one the kernel merged with a later mmap stays [anon].
                    name = f"{Path(previous_file).name} .bss" if limit and end <= limit else "[anon]"
                    previous_file = None
                elif path.startswith("["):
                    name, previous_file = re.sub(r":.*", "]", path), None  # [stack], [heap], [anon:...]
                else:
                    path = path.removesuffix(" (deleted)")
                    name, previous_file = Path(path).name, path
                    paths[name] = path
                    if offset == 0 and path not in ranges:  # the first mapping: the library's load base
                        load_end = elf_load_end(path)
                        ranges[path] = start + -(-load_end // 4096) * 4096 if load_end else None
            elif name and line.startswith(("Private_Dirty:", "Private_Clean:")):
                field, kb = line.split()[:2]
                groups[name]["private_dirty_kb" if field == "Private_Dirty:" else "private_clean_kb"] += int(kb)
    for group_name, group in groups.items():
        library = group_name.removesuffix(" .bss")
        group["path"] = paths.get(library, "")
        group["cuda"] = bool(library in paths and CUDA_LIBRARY.search(paths[library]))
    return dict(groups)


def summarise_mappings(groups: dict, top: int = 12) -> dict:
    """Totals (private dirty MB: anonymous, libraries, CUDA libraries) and the top groups."""
    def mb(kb: int) -> float:
        return kb / 1024

    dirty = {name: g["private_dirty_kb"] for name, g in groups.items()}
    anonymous = sum(kb for name, kb in dirty.items() if name.startswith("["))
    cuda = sum(kb for name, kb in dirty.items() if groups[name]["cuda"])
    return {
        "private_dirty_mb": mb(sum(dirty.values())),
        "private_clean_mb": mb(sum(g["private_clean_kb"] for g in groups.values())),
        "anonymous_dirty_mb": mb(anonymous),  # [heap] + [anon] + [stack]
        "library_dirty_mb": mb(sum(dirty.values()) - anonymous),  # file-backed pages and .bss of all libraries
        "cuda_library_dirty_mb": mb(cuda),
        "top": [{"mapping": name, "private_dirty_mb": mb(groups[name]["private_dirty_kb"]),
                 "private_clean_mb": mb(groups[name]["private_clean_kb"]), "cuda": groups[name]["cuda"]}
                for name in sorted(dirty, key=dirty.get, reverse=True)[:top]],
    }


def rollup(pid: int | str = "self") -> dict:
    """MB of one process from /proc/PID/smaps_rollup: rss, pss, uss = private_dirty + private_clean.

    Private clean pages are file pages (libraries) that no other process maps right now: they
    count in USS, but become shared as soon as a second process maps the same files, and the
    kernel can drop them at will. Private dirty pages (heap, anonymous memory, written library
    data) are what a process really holds alone.
    """
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as lines:
        for line in lines:
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                fields[key] = int(value.split()[0]) / 1024
    return {"rss": fields["Rss"], "pss": fields["Pss"], "pss_anon": fields["Pss_Anon"],
            "private_dirty": fields["Private_Dirty"], "private_clean": fields["Private_Clean"],
            "uss": fields["Private_Dirty"] + fields["Private_Clean"]}


def after_malloc_trim() -> dict:
    """rollup() once glibc has handed its free heap pages back (malloc_trim(0)): a diagnostic of how
    much of a process's private memory is freed-but-kept malloc space rather than live data. Call it
    last: it changes the process it measures."""
    from trainables.loop import release_freed_memory

    release_freed_memory()
    return rollup()


def send_code_by_value() -> None:
    """Ray workers cannot import benchmarks/: make Ray pickle this module's functions with their code."""
    if __name__ != "__main__":  # __main__'s functions always travel by value
        from ray import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[__name__])


def dataset_mb(splits) -> float:
    """MB of every array in a trainables.data.Splits."""
    return sum(a.nbytes for a in vars(splits).values() if hasattr(a, "nbytes")) / MB


# ---------------------------------------------------------------- (a) a fresh worker's floor


def worker_floor(data_ref, threads: int = 1) -> dict:
    """USS of a fresh Ray worker: bare, after `import torch`, after one epoch of `fit`."""
    import ray

    def measure(refs: list) -> dict:
        bare = rollup()
        import torch  # imported here, not captured: the bare figure must come first

        imported = rollup()
        imported_map = summarise_mappings(private_memory_by_mapping())
        from trainables.config import HyperParams
        from trainables.loop import fit

        torch.set_num_threads(threads)
        fit(HyperParams(epochs=1), ray.get(refs[0]), torch.device("cpu"), lambda metrics, checkpoint: None)
        after = rollup()
        mappings = summarise_mappings(private_memory_by_mapping())
        return {"bare_mb": bare["uss"], "torch_imported_mb": imported["uss"], "after_epoch_mb": after["uss"],
                "bare": bare, "torch_imported": imported, "after_epoch": after,
                "torch_imported_mappings": imported_map, "after_epoch_mappings": mappings,
                "after_malloc_trim": after_malloc_trim()}

    send_code_by_value()
    # A runtime_env of its own makes Ray start a new process rather than reuse one.
    remote = ray.remote(num_cpus=threads, runtime_env={"env_vars": {"LENET_MEMORY_FRESH_WORKER": "1"}})(measure)
    return ray.get(remote.remote([data_ref]))


# ---------------------------------------------------------------- (b) the product's trials


CHILD_FACTS, THIN_FACTS = 10**6, 10**6 + 1  # the "epoch" of each extra report, to tell them apart


def measured_child(job: dict, splits, report) -> None:
    """In the forked child: the product's training (trainables.forkserver.train), then what the child saw
    (threads, data) and where its private memory lies."""
    import torch

    from trainables.forkserver import train

    train(job, splits, report)
    at_end, mappings = rollup(), summarise_mappings(private_memory_by_mapping())
    report({"epoch": CHILD_FACTS, "child_pid": os.getpid(), "torch_threads": torch.get_num_threads(),
            "data_writeable": int(splits.train_images.flags.writeable),
            "uss_at_end_mb": at_end["uss"], "private_dirty_at_end_mb": at_end["private_dirty"],
            "uss_after_malloc_trim_mb": after_malloc_trim()["uss"], "mappings_json": json.dumps(mappings)}, None)


def measured_trial(config: dict, **bound) -> None:
    """The product's trial function (its thin Tune process, and the child it has forked), then the thin
    process's own memory."""
    from ray import tune

    from trainables.trial import trial_driver

    trial_driver(config, **bound, entry=measured_child)
    tune.report({"epoch": THIN_FACTS, "pid": os.getpid(), "thin_uss_mb": rollup()["uss"],
                 "thin_mappings_json": json.dumps(summarise_mappings(private_memory_by_mapping()))})


def children_of(pid: int) -> list[int]:
    """The child processes of `pid` (every thread's children: the fork server forks from several)."""
    children = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as found:
                children += [int(child) for child in found.read().split()]
    return children


class TrialMemorySampler(threading.Thread):
    """Every `interval_s`: smaps_rollup of each live Tune function trial (the thin process), of the node's
    fork server and of each child it has forked, and the object store's bytes."""

    def __init__(self, interval_s: float = 0.5):
        super().__init__(daemon=True)
        self.interval_s, self.samples, self.halt = interval_s, [], threading.Event()

    def run(self):
        from ray.util.state import list_actors

        state = gcs_state()
        while not self.halt.wait(self.interval_s):
            try:
                actors = list_actors(filters=[("state", "=", "ALIVE")], timeout=5)
                store = object_store_mb(state)
            except Exception:  # the state API times out on a starved machine: skip the sample
                continue
            processes, roles = {}, {}
            for actor in actors:
                if "ImplicitFunc" in actor.class_name:  # a Tune function trial
                    roles[actor.pid] = "trial"
                elif actor.class_name == "ForkServer":
                    roles[actor.pid] = "server"
                    roles.update(dict.fromkeys(children_of(actor.pid), "child"))
            for pid, role in roles.items():
                with contextlib.suppress(OSError, KeyError):
                    processes[pid] = {**rollup(pid), "role": role}
            self.samples.append({"processes": processes, "object_store_mb": store})

    def peak(self, trials: int) -> dict:
        """Peaks over the samples in which all `trials` trials and their children were alive (sums: the
        largest sample sum, over every process of the trials: thin trials, fork server, children)."""
        def count(sample: dict, role: str) -> int:
            return sum(p["role"] == role for p in sample["processes"].values())

        full = [s for s in self.samples if count(s, "trial") == trials and count(s, "child") == trials] or [
            {"processes": {}, "object_store_mb": 0.0}]

        def largest_sum(key: str) -> float:
            return max(sum(p[key] for p in s["processes"].values()) for s in full)

        def largest(key: str) -> float:
            return max((p[key] for s in full for p in s["processes"].values()), default=0.0)

        def largest_of(role: str, key: str) -> float:
            return max((p[key] for s in full for p in s["processes"].values() if p["role"] == role), default=0.0)

        return {"samples": len(full), "uss_sum_mb": largest_sum("uss"), "uss_max_mb": largest("uss"),
                "private_dirty_sum_mb": largest_sum("private_dirty"), "pss_sum_mb": largest_sum("pss"),
                "pss_anon_sum_mb": largest_sum("pss_anon"), "rss_max_mb": largest("rss"),
                "object_store_mb": max(s["object_store_mb"] for s in full),
                **{f"{role}_{key}_max_mb": largest_of(role, key)
                   for role in ("trial", "server", "child") for key in ("private_dirty", "pss_anon")}}


def gcs_state():
    """A connection to the running Ray cluster's GCS, for object_store_mb (open one and reuse it)."""
    import ray
    from ray._private.internal_api import get_state_from_address

    return get_state_from_address(ray.get_runtime_context().gcs_address)


def object_store_mb(state=None) -> float:
    """MB in use in the object store (`state`: from gcs_state(); a new connection when None)."""
    from ray._private.internal_api import get_memory_info_reply

    return get_memory_info_reply(state or gcs_state()).store_stats.object_store_bytes_used / MB


def trials_memory(data_ref, scratch: Path) -> dict:
    """1 trial of 2 CPUs, then 2 concurrent trials of 1 CPU, each 1 epoch of the real trial function."""
    from ray import tune

    from trainables.config import HyperParams, Resources

    send_code_by_value()
    shapes = {}
    for trials, cpus in ((1, 2), (2, 1)):
        trainable = tune.with_resources(tune.with_parameters(
            measured_trial, base=HyperParams(epochs=1).model_dump(),
            resources=Resources(cpus_per_worker=cpus).model_dump(), data_refs=[data_ref]), {"cpu": cpus})
        sampler = TrialMemorySampler()
        sampler.start()
        started = time.perf_counter()
        grid = tune.Tuner(trainable, param_space={"copy": tune.grid_search(list(range(trials)))},
                          tune_config=tune.TuneConfig(max_concurrent_trials=trials),
                          run_config=tune.RunConfig(storage_path=str(scratch / "tune"), verbose=0)).fit()
        sampler.halt.set()
        sampler.join()
        errors = [str(r.error) for r in grid if r.error]
        if errors:
            raise RuntimeError(f"trial failed: {errors[0]}")
        results = sorted(grid, key=lambda r: r.metrics["pid"])
        child = [r.metrics_dataframe.set_index("epoch").loc[CHILD_FACTS] for r in results]  # the child's own report
        shapes[f"{trials}x{cpus}"] = {
            "trials": trials, "cpus_per_trial": cpus, "seconds": time.perf_counter() - started,
            "pids": [r.metrics["pid"] for r in results], "child_pids": [int(c["child_pid"]) for c in child],
            "torch_threads": [int(c["torch_threads"]) for c in child],
            "data_writeable": any(c["data_writeable"] for c in child),
            "uss_at_end_mb": [c["uss_at_end_mb"] for c in child],
            "private_dirty_at_end_mb": [c["private_dirty_at_end_mb"] for c in child],
            "uss_after_malloc_trim_mb": [c["uss_after_malloc_trim_mb"] for c in child],
            "thin_uss_at_end_mb": [r.metrics["thin_uss_mb"] for r in results],
            "mappings": json.loads(child[0]["mappings_json"]),
            "thin_mappings": json.loads(results[0].metrics["thin_mappings_json"]), **sampler.peak(trials)}
    return shapes


def extra_trial(shapes: dict) -> dict:
    """What the second concurrent trial adds: 2 trials x 1 CPU less 1 trial x 2 CPUs, object store included.

    extra_trial_mb is the difference on USS; the same on memory no other process can share
    (private dirty) and on proportional set size beside it.
    """
    one, two = shapes["1x2"], shapes["2x1"]
    store = two["object_store_mb"] - one["object_store_mb"]
    uss = two["uss_sum_mb"] - one["uss_sum_mb"]
    return {"extra_trial_uss_mb": uss, "extra_trial_object_store_mb": store, "extra_trial_mb": uss + store,
            "extra_trial_anon_mb": two["pss_anon_sum_mb"] - one["pss_anon_sum_mb"] + store,
            "extra_trial_private_dirty_mb": two["private_dirty_sum_mb"] - one["private_dirty_sum_mb"] + store,
            "extra_trial_pss_mb": two["pss_sum_mb"] - one["pss_sum_mb"] + store}


# ---------------------------------------------------------------- measurement


def build() -> dict:
    import torch

    return {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cuda_compiled": torch.version.cuda is not None, "torchvision_installed": _installed("torchvision")}


def code_version() -> str:
    """The commit of the trainables measured (+ "-dirty" when its tree has changes), or a COMMIT file's."""
    import subprocess

    import trainables

    root = Path(trainables.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return f"{commit}{'-dirty' if dirty else ''} ({root})"
    except (OSError, subprocess.CalledProcessError):
        note = root / "COMMIT"
        return f"{note.read_text().strip() if note.exists() else 'unknown'} ({root})"


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of the whole machine since boot, from /proc/stat (every process, ours too)."""
    with open("/proc/stat") as stat:
        ticks = [int(v) for v in stat.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return sum(ticks[:8]) - idle, sum(ticks[:8])


def measure(args: argparse.Namespace) -> dict:
    import ray

    from jobs.runtime import connect_ray
    from trainables.config import DataConfig
    from trainables.data import load_splits

    started, load_start = time.time(), os.getloadavg()
    cpu_start = cpu_ticks()
    results = {"label": args.label, "command": " ".join(["python", "benchmarks/memory.py", *sys.argv[1:]]),
               "python": sys.executable, "code": code_version(), "build": build(), "ray": ray.__version__, "cores": os.cpu_count(),
               "load_average_start": list(load_start)}
    print(json.dumps(results), flush=True)
    splits = load_splits(DataConfig(source=f"imagefolder:{args.data}"))
    results["dataset_mb"] = dataset_mb(splits)
    results["torchvision_imported_by_driver"] = "torchvision" in sys.modules

    scratch = Path(tempfile.mkdtemp(prefix="lenet-memory-"))
    try:
        connect_ray(num_cpus=args.cpus)
        store_empty = object_store_mb()
        data_ref = ray.put(splits)
        del splits
        results["object_store"] = {"empty_mb": store_empty, "after_put_mb": object_store_mb()}
        results["shapes"] = trials_memory(data_ref, scratch)
        results["worker_floor"] = worker_floor(data_ref)
        results["torchvision_imported_by_driver"] |= "torchvision" in sys.modules
    finally:
        ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)
    results.update(extra_trial(results["shapes"]))
    results["target_met"] = results["extra_trial_anon_mb"] <= TARGET_EXTRA_TRIAL_MB
    cpu_end = cpu_ticks()
    results.update(seconds=time.time() - started, load_average_end=list(os.getloadavg()),
                   machine_busy_cores=(cpu_end[0] - cpu_start[0]) / max(cpu_end[1] - cpu_start[1], 1)
                   * (os.cpu_count() or 1))
    return results


# ---------------------------------------------------------------- report


def markdown(runs: list[dict]) -> str:
    """One column per run: the floor, the trials, extra_trial_mb, then each run's breakdown."""
    def row(title: str, values) -> str:
        return f"| {title} | " + " | ".join(values) + " |"

    def f0(value) -> str:
        return "-" if value is None else f"{value:,.0f}"

    heads = [r.get("label") or f"{r['build']['torch']} (CUDA {r['build']['torch_cuda'] or 'none'})" for r in runs]
    lines = ["| MB | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(runs),
             row("torch (torch.version.cuda)", [f"{r['build']['torch']} ({r['build']['torch_cuda']})" for r in runs]),
             row("fresh Ray worker, bare (USS)", [f0(r["worker_floor"]["bare_mb"]) for r in runs]),
             row("... after `import torch`", [f0(r["worker_floor"]["torch_imported_mb"]) for r in runs]),
             row("... after one epoch of `fit`", [f0(r["worker_floor"]["after_epoch_mb"]) for r in runs]),
             row("... after one epoch: private dirty", [f0(r["worker_floor"]["after_epoch"]["private_dirty"]) for r in runs]),
             row("1 trial x 2 CPUs: peak USS", [f0(r["shapes"]["1x2"]["uss_sum_mb"]) for r in runs]),
             row("2 trials x 1 CPU: peak USS sum", [f0(r["shapes"]["2x1"]["uss_sum_mb"]) for r in runs]),
             row("peak private dirty: 1x2 / 2x1 sum", [f"{f0(r['shapes']['1x2']['private_dirty_sum_mb'])} / "
                                                      f"{f0(r['shapes']['2x1']['private_dirty_sum_mb'])}" for r in runs]),
             row("2 trials x 1 CPU: USS per trial at end", [" / ".join(f0(v) for v in r["shapes"]["2x1"]["uss_at_end_mb"])
                                                            for r in runs]),
             row("... the same after malloc_trim(0)", [" / ".join(f0(v) for v in r["shapes"]["2x1"]["uss_after_malloc_trim_mb"])
                                                       for r in runs]),
             row("fresh worker after epoch, after malloc_trim(0)", [f0(r["worker_floor"]["after_malloc_trim"]["uss"])
                                                                   for r in runs]),
             row("object store: empty / dataset put", [f"{f0(r['object_store']['empty_mb'])} / "
                                                       f"{f0(r['object_store']['after_put_mb'])}" for r in runs]),
             row("object store peak: 1x2 / 2x1", [f"{f0(r['shapes']['1x2']['object_store_mb'])} / "
                                                  f"{f0(r['shapes']['2x1']['object_store_mb'])}" for r in runs]),
             row("dataset (arrays)", [f0(r["dataset_mb"]) for r in runs]),
             row("**extra trial, anonymous memory (PSS)** (target <= 300)", [
                 f"**{f0(r.get('extra_trial_anon_mb'))}** ({'met' if r['target_met'] else 'not met'})"
                 for r in runs]),
             row("... same on private dirty / USS / PSS", [
                 f"{f0(r['extra_trial_private_dirty_mb'])} / {f0(r['extra_trial_mb'])} / {f0(r['extra_trial_pss_mb'])}"
                 for r in runs]),
             row("trial's training process: private dirty, all", [f0(r["shapes"]["2x1"]["mappings"]["private_dirty_mb"])
                                                                  for r in runs]),
             row("... [heap] + [anon] + [stack]", [f0(r["shapes"]["2x1"]["mappings"]["anonymous_dirty_mb"]) for r in runs]),
             row("... libraries (file pages + .bss)", [f0(r["shapes"]["2x1"]["mappings"]["library_dirty_mb"]) for r in runs]),
             row("... of which CUDA libraries", [f0(r["shapes"]["2x1"]["mappings"]["cuda_library_dirty_mb"]) for r in runs]),
             row("trial's training process: private clean", [f0(r["shapes"]["2x1"]["mappings"]["private_clean_mb"])
                                                             for r in runs]),
             row("thin Tune trial process: private dirty", [f0(r["shapes"]["2x1"].get("thin_mappings", {}).get(
                 "private_dirty_mb")) for r in runs]),
             row("fork server (one per node): private dirty / PSS anon, peak", [
                 f"{f0(r['shapes']['2x1'].get('server_private_dirty_max_mb'))} / "
                 f"{f0(r['shapes']['2x1'].get('server_pss_anon_max_mb'))}" for r in runs]),
             row("load average start / end (1 min)", [f"{r['load_average_start'][0]:.1f} / {r['load_average_end'][0]:.1f}"
                                                      for r in runs]),
             row("cores busy, whole machine, during run", [f"{r['machine_busy_cores']:.2f}" for r in runs]),
             row("seconds", [f0(r["seconds"]) for r in runs]),
             row("code", [r.get("code", "-") for r in runs])]
    for head, r in zip(heads, runs):
        lines += ["", f"Private dirty memory of one 1-CPU trial's training process ({head}), top mappings (MB):", "",
                  "| mapping | private dirty | private clean | CUDA |", "|---|---:|---:|---|"]
        for m in r["shapes"]["2x1"]["mappings"]["top"]:
            lines.append(f"| {m['mapping']} | {m['private_dirty_mb']:.1f} | {m['private_clean_mb']:.1f} "
                         f"| {'yes' if m['cuda'] else ''} |")
        imported = r["worker_floor"]["torch_imported_mappings"]
        lines.append(f"\nA bare worker after `import torch`: private dirty {imported['private_dirty_mb']:.0f} MB "
                     f"([heap]/[anon] {imported['anonymous_dirty_mb']:.0f}, libraries {imported['library_dirty_mb']:.0f}, "
                     f"of which CUDA libraries {imported['cuda_library_dirty_mb']:.0f}).")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default="/tmp/cifar", help="image folder: DATA/train/<class>/*.jpg")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the in-process Ray")
    parser.add_argument("--label", default="", help="column title (default: the torch version)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--compare", type=Path, nargs="+", metavar="JSON",
                        help="print earlier --json results side by side and measure nothing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.compare:
        print(markdown([json.loads(path.read_text()) for path in args.compare]))
        return
    results = measure(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(markdown([results]))


if __name__ == "__main__":
    main()
