"""lenet-tune submit / jobs: run a lenet-tune command on a Ray cluster as a Ray Job.

On this machine (after `lenet-tune cluster up`; MLflow and results go to its folder):
    lenet-tune submit -- tune --smoke
    lenet-tune submit --no-wait -- tune --data cifar10 --num-samples 8
    lenet-tune jobs list | status ID | logs ID [--follow] | stop ID
On a cloud or Kubernetes cluster (dashboard tunnelled to 127.0.0.1:8265, see cluster/README.md):
    RAY_ADDRESS=http://127.0.0.1:8265 lenet-tune submit -- tune --data cifar10 --gpus-per-worker 0.5

The job ships this repository as its working_dir (without data/, results/, MLflow stores or
caches) and runs `python -m jobs.cli <the words after -->` on the cluster. It authenticates with
the cluster's Ray token: $RAY_AUTH_TOKEN, else the file $RAY_AUTH_TOKEN_PATH, else
~/.ray/auth_token. The token travels only in the Authorization header.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import time
from pathlib import Path

import requests

from jobs.cluster import DEFAULT_FOLDER, auth_headers, read_token, running_state
from jobs.runtime import UsageError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
SUBMITTABLE = ("tune", "train", "evaluate")  # commands that make sense as a cluster job
# gitignore-style: a leading / anchors to the repository root.
EXCLUDES = ["/data/", "/results/", "/mlartifacts/", "/mlruns/", "/mlflow.db", "*.db-journal", ".venv/",
            "/.lenet-cluster/", ".git", "__pycache__/", "*.npz", ".lenet-cache/", ".pytest_cache/",
            "*.egg-info/", "/build/"]
CONNECT_TIMEOUT_S = (5, 20)  # (connect, read): an address where nothing answers fails well within 30 s
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def repo_root() -> Path:
    """The checkout this code runs from; the job ships it to the cluster."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file() or not (root / "trainables").is_dir():
        raise UsageError(f"lenet-tune runs from {root}, not a checkout: install it with "
                         "`pip install -e .` in the repository so `submit` can ship it")
    return root


def resolve_address(flag: str | None, local: dict | None) -> str:
    """--address, else $RAY_ADDRESS if it is a URL, else the local cluster's dashboard, else :8265."""
    env = os.environ.get("RAY_ADDRESS", "")
    address = flag or (env if env.startswith(("http://", "https://")) else None) or (
        local["ray"]["dashboard_url"] if local else DEFAULT_ADDRESS)
    if "://" not in address:
        address = f"http://{address}"
    if not address.startswith(("http://", "https://")):
        raise UsageError(f"--address {address}: use the dashboard's http(s) URL, e.g. {DEFAULT_ADDRESS}")
    return address.rstrip("/")


def job_env(address: str, tracking_uri: str | None, local: dict | None) -> dict:
    """Environment of the job driver: where MLflow and Ray results are.

    The local cluster's MLflow server and results folder are used only for a job sent to that
    cluster; a remote cluster keeps the values its nodes were configured with.
    """
    here = local if local and local["ray"]["dashboard_url"] == address else None
    env = {}
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or (here and here["mlflow"]["tracking_uri"])
    if uri:
        env["MLFLOW_TRACKING_URI"] = uri
    storage = os.environ.get("LENET_STORAGE_PATH") or (here and here["storage_path"])
    if storage:
        env["LENET_STORAGE_PATH"] = storage
    return env


def runtime_env(root: Path, env_vars: dict, local: dict | None) -> dict:
    excludes = list(EXCLUDES)
    if local and Path(local["folder"]).is_relative_to(root):  # a cluster folder inside the checkout
        excludes.append("/" + Path(local["folder"]).relative_to(root).as_posix() + "/")
    return {"working_dir": str(root), "excludes": excludes, "env_vars": env_vars}


def check_command(words: list[str]) -> tuple[list[str], object]:
    """The lenet-tune command to run and its parsed flags; a command the cluster would refuse is refused here."""
    if words[:1] == ["--"]:
        words = words[1:]
    if not words:
        raise UsageError("nothing to submit: put a lenet-tune command after --, "
                         "e.g. lenet-tune submit -- tune --smoke")
    if words[0] not in SUBMITTABLE:
        raise UsageError(f"cannot submit {words[0]!r}: submit one of {', '.join(SUBMITTABLE)}, "
                         "e.g. lenet-tune submit -- tune --smoke")
    from jobs.cli import build_parser

    return words, build_parser().parse_args(words)  # a bad flag exits 2 here, before any upload


def check_values(words: list[str], parsed) -> None:
    """Refuse bad values here (one line, exit 2) rather than after the upload, on the cluster."""
    from jobs.cli import configs_from_args

    if words[0] in ("tune", "train"):
        configs = configs_from_args(parsed)  # bad values raise ValidationError: one line via the CLI
        if words[0] == "tune":
            from jobs.tune import param_space

            param_space(configs["space"])


def entrypoint(words: list[str]) -> str:
    return "python -m jobs.cli " + shlex.join(words)


def connect(address: str):
    """A JobSubmissionClient for address; refuses in one line if nobody answers or the token is wrong."""
    headers = auth_headers()
    for attempt in range(3):  # a dashboard busy on 2 cores may drop one connection; a dead port stays dead
        try:
            reply = requests.get(f"{address}/api/version", headers=headers, timeout=CONNECT_TIMEOUT_S)
            if reply.status_code < 500:
                break
        except requests.RequestException as error:
            if attempt == 2 or not isinstance(error, requests.ConnectionError):  # a timeout took its time
                raise UsageError(f"no Ray dashboard answers at {address} ({type(error).__name__}): start one "
                                 "with `lenet-tune cluster up`, or pass --address / RAY_ADDRESS") from None
        time.sleep(1)
    if reply.status_code == 401:
        raise UsageError(f"the Ray cluster at {address} wants a token (401) and none was found in "
                         f"{read_token()[1]}: set RAY_AUTH_TOKEN or write the cluster's token to ~/.ray/auth_token")
    if reply.status_code == 403:
        raise UsageError(f"the Ray cluster at {address} refused the token from {read_token()[1]} (403): "
                         "use the token the cluster was started with")
    if not reply.ok:
        raise UsageError(f"{address}/api/version answered {reply.status_code}: is it a Ray dashboard?")
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address, headers=headers)


def submit(client, words: list[str], env: dict, root: Path, local: dict | None) -> str:
    for noisy in ("ray._private.runtime_env", "ray.dashboard.modules.dashboard_sdk"):  # a line per file
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return client.submit_job(entrypoint=entrypoint(words), runtime_env=runtime_env(root, env, local),
                                 metadata={"lenet_command": shlex.join(words)})
    except (RuntimeError, ValueError) as error:  # e.g. a working_dir over Ray's upload limit
        raise UsageError(f"the cluster did not take the job: {str(error).splitlines()[0]}") from None


def follow(client, job_id: str) -> int:
    """Print the job's output as it comes, then its final status; 0 if it SUCCEEDED, else 1."""
    printed = 0

    async def tail():
        nonlocal printed
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()
            printed += len(chunk)

    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)  # "WebSocket closed"
    try:
        asyncio.run(tail())
    except Exception as error:  # the websocket dropped: poll instead, printing what was missed
        print(f"(log stream ended: {type(error).__name__}; polling)", file=sys.stderr)
    try:
        while (status := str(client.get_job_status(job_id).value)) not in TERMINAL:
            time.sleep(2)
        logs = client.get_job_logs(job_id)
    except requests.RequestException as error:
        raise UsageError(f"lost the cluster while following {job_id} ({type(error).__name__}): "
                         f"the job may still run; see `lenet-tune jobs status {job_id}`") from None
    sys.stdout.write(logs[printed:])
    print(f"job {job_id} {status}")
    return 0 if status == "SUCCEEDED" else 1


def _job_call(call, job_id: str, address: str):
    try:
        return call(job_id)
    except RuntimeError as error:
        if "404" in str(error) or "does not exist" in str(error):
            raise UsageError(f"no job {job_id!r} on {address}: see `lenet-tune jobs list`") from None
        raise


def add_parser(commands) -> None:
    def common(parser):
        parser.add_argument("--address", metavar="URL", help="Ray dashboard URL (default $RAY_ADDRESS if http(s), "
                                                             f"else the local cluster's, else {DEFAULT_ADDRESS})")
        parser.add_argument("--folder", default=DEFAULT_FOLDER, metavar="DIR",
                            help=f"folder of the local cluster to use (default ./{DEFAULT_FOLDER})")
        parser.set_defaults(handler=run)
        return parser

    parser = common(commands.add_parser(
        "submit", help="run a lenet-tune command on a Ray cluster as a Ray Job",
        description="Ships this checkout and runs `python -m jobs.cli COMMAND` on the cluster; "
                    "exits 0 when the job SUCCEEDED, 1 when it did not"))
    parser.add_argument("--tracking-uri", metavar="URI", help="MLflow URI for the job (default $MLFLOW_TRACKING_URI, "
                                                              "else the local cluster's server, else the nodes' own)")
    parser.add_argument("--no-wait", action="store_true",
                        help="print the job id and return instead of streaming logs (default: wait)")
    parser.add_argument("words", nargs="*", metavar="-- COMMAND", help="the lenet-tune command, e.g. -- tune --smoke")

    actions = commands.add_parser("jobs", help="list, inspect, follow or stop Ray Jobs").add_subparsers(
        dest="action", required=True)
    common(actions.add_parser("list", help="every job: id, status, start time, command"))
    for action, text in (("status", "status of job ID"), ("logs", "output of job ID"), ("stop", "stop job ID")):
        sub = common(actions.add_parser(action, help=text))
        sub.add_argument("job_id", metavar="ID", help="a submission id from `lenet-tune jobs list`")
    actions.choices["logs"].add_argument("--follow", action="store_true",
                                         help="stream until the job ends, then print its status (default: print)")


def run(args) -> int:
    local = running_state(Path(args.folder).expanduser())
    address = resolve_address(args.address, local)
    if args.command == "submit":
        words, parsed = check_command(list(args.words))
        root = repo_root()
        client = connect(address)  # before the slower value checks: a dead address fails fast
        check_values(words, parsed)
        env = job_env(address, args.tracking_uri, local)
        job_id = submit(client, words, env, root, local)
        print(f"submitted {job_id} to {address}: {entrypoint(words)}", flush=True)
        if args.no_wait:
            print(f"follow: lenet-tune jobs logs {job_id} --follow    stop: lenet-tune jobs stop {job_id}")
            return 0
        try:
            return follow(client, job_id)
        except KeyboardInterrupt:
            print(f"\nstopped following; {job_id} keeps running (lenet-tune jobs stop {job_id})", file=sys.stderr)
            return 130

    client = connect(address)
    if args.action == "list":
        jobs = client.list_jobs()
        if not jobs:
            print(f"no jobs on {address}")
        for job in sorted(jobs, key=lambda job: job.start_time or 0):
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000)) \
                if job.start_time else "-"
            print(f"{job.submission_id or job.job_id}  {job.status.value:<9}  {started}  {job.entrypoint}")
    elif args.action == "status":
        info = _job_call(client.get_job_info, args.job_id, address)
        print(f"{args.job_id} {info.status.value}" + (f": {info.message}" if info.message else ""))
        return 0 if info.status.value != "FAILED" else 1
    elif args.action == "logs" and args.follow:
        _job_call(client.get_job_status, args.job_id, address)  # an unknown id: one line, before the stream
        return follow(client, args.job_id)
    elif args.action == "logs":
        sys.stdout.write(_job_call(client.get_job_logs, args.job_id, address))
    else:
        stopped = _job_call(client.stop_job, args.job_id, address)
        print(f"stop requested for {args.job_id}" if stopped else f"{args.job_id} had already ended")
    return 0
