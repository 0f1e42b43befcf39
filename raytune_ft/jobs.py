"""The job layer: ship a command to a Ray cluster through the Job Submission SDK, and follow it.

A submitted job runs the same ``raytune-ft run`` (or ``tune``, ``post``, ``fuse``) as a laptop
does; this module adds only packaging (the working directory as the job's runtime environment),
the checks that what the job reads will be there, and submission. The cluster's token is read the
way Ray reads it (``RAY_AUTH_TOKEN``, the file in ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``)
and sent as a header, never over plain HTTP to another machine; it is never printed, logged or put
in the job.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import shlex
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator
from urllib.parse import urlsplit

import tenacity

from raytune_ft import ray_compat
from raytune_ft.errors import UserError

if TYPE_CHECKING:
    from raytune_ft.schema import Recipe

logger = logging.getLogger(__name__)

# Never shipped: local environments, outputs and caches (Ray also honours .gitignore).
WORKING_DIR_EXCLUDES = [".venv", "venv", ".git", "runs", ".cache", "__pycache__", "*.egg-info", ".pytest_cache", "build", "dist"]
TOKEN_HELP = ("set RAY_AUTH_TOKEN to the cluster's token, RAY_AUTH_TOKEN_PATH to a file holding it, "
              "or put it in ~/.ray/auth_token (on the head: ray get-auth-token)")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
NO_AGENT = "No available agent to submit job"  # the head's answer while its job agent is not up
AGENT_WAIT_S = 90.0
WORKING_DIR_LIMIT = "Ray uploads a working directory of at most 512 MiB zipped"


class JobFailed(UserError):
    """A job ended without succeeding: reported on one line like a user error, exit code 1."""

    exit_code = 1


def auth_token() -> str | None:
    """The cluster token, looked up in Ray's order; None when there is none."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path_text = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(path_text).expanduser() if path_text else Path.home() / ".ray" / "auth_token"
    if path_text and not path.is_file():
        raise UserError("RAY_AUTH_TOKEN_PATH", f"{path} is not a file; {TOKEN_HELP}")
    token = path.read_text().strip() if path.is_file() else ""
    return token or None


def resolve_address(address: str | None) -> str:
    """The dashboard address to use; plain HTTP only to this machine (an SSH tunnel or kubectl
    port-forward ends here), since the token and the job would cross the network readable."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError("--address", "give the head's dashboard address, e.g. http://127.0.0.1:8265 "
                                     "(through an SSH tunnel: ray dashboard cluster.yaml), or set RAY_API_SERVER_ADDRESS")
    parts = urlsplit(address if "://" in address else f"http://{address}")
    if parts.scheme == "http" and not is_loopback(parts.hostname or ""):
        raise UserError("--address", f"{address} is plain HTTP to another machine, which would carry the cluster's token "
                                     "readable; reach the dashboard through an SSH tunnel (ray dashboard cluster.yaml) or "
                                     "kubectl port-forward and give http://127.0.0.1:8265, or an https:// address (docs/clusters.md)")
    return address


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextmanager
def job_api_errors(address: str) -> Iterator[None]:
    """Turn the SDK's connection, auth and request failures into one-line user errors."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as error:
        if not str(error).startswith("Authentication "):  # Ray's own check, before any request
            raise UserError("RAY_AUTH_MODE", f"is token but no token was found; {TOKEN_HELP}") from None
        problem = "the token was rejected" if "Forbidden" in str(error) else "the cluster requires a token and none was sent"
        raise UserError(address, f"{problem}; {TOKEN_HELP}") from None
    except ConnectionError:
        raise UserError("--address", f"cannot reach the Ray dashboard at {address}; is the cluster up, "
                                     "and the port tunnelled (ray dashboard cluster.yaml)?") from None
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(address, first.removeprefix("Request failed with status code ")) from None


@contextmanager
def job_client(address: str | None):
    """A connected JobSubmissionClient that sends the token (if any) as a bearer header."""
    from ray.job_submission import JobSubmissionClient

    address = resolve_address(address)
    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with job_api_errors(address):
        yield JobSubmissionClient(address, headers=headers)


def entrypoint(arguments: list[str]) -> str:
    """The shell command the job runs (``arguments``: ``raytune-ft``'s); ``python -m`` runs the
    shipped code where the working directory holds the project, the installed project elsewhere."""
    return shlex.join(["python", "-m", "raytune_ft.cli", *arguments])


def runtime_env(working_dir: Path, pip: list[str]) -> dict:
    # Ray Train and Tune move their workers into the run's folder by default; the job's paths into
    # its shipped working directory are relative to it, so every process stays there.
    env: dict = {"working_dir": str(working_dir), "excludes": WORKING_DIR_EXCLUDES,
                 "env_vars": {"RAY_CHDIR_TO_TRIAL_DIR": "0"}}
    if pip:
        env["pip"] = pip
    return env


def working_directory(path: Path) -> Path:
    working_dir = path.expanduser().resolve()
    if not working_dir.is_dir():
        raise UserError("--working-dir", f"{working_dir} is not a directory")
    return working_dir


def recipe_in_working_dir(recipe: Path, working_dir: Path) -> Path:
    """The recipe's path inside the working directory, which is the job's current directory."""
    try:
        return recipe.resolve().relative_to(working_dir)
    except ValueError:
        raise UserError(str(recipe), f"is not inside the working directory {working_dir} that ships with the job; "
                                     "pass --working-dir") from None


def shipped_paths(recipe: Recipe, working_dir: Path) -> list[str]:
    """``--set`` overrides that point the job at the shipped copies of the local paths the run
    reads. A path that exists here outside the working directory, or inside it but left out of
    what ships (.gitignore, .rayignore, the excludes), is refused: the cluster would not find it.
    A relative path is the job's (from the working directory); one that does not exist here is
    left for the cluster (a mount only its nodes have, a hub id)."""
    from raytune_ft.recipe import read_paths

    overrides = []
    for field, text in read_paths(recipe):
        if field == "the recipe":  # shipped as the job's argument
            continue
        given = Path(text).expanduser()
        path = (given if given.is_absolute() else working_dir / given).resolve()
        if not path.is_relative_to(working_dir):
            if path.exists():
                raise UserError(field, f"{text} is on this machine only, outside the working directory {working_dir} that "
                                       f"ships with the job; move it into the working directory ({WORKING_DIR_LIMIT}) "
                                       "or onto storage every node reads (s3://, gs://, a shared mount)")
            continue
        if path.exists() and not ray_compat.ships_with_working_dir(path, working_dir, WORKING_DIR_EXCLUDES):
            raise UserError(field, f"{text} is in the working directory but left out of what ships with the job "
                                   "(.gitignore, .rayignore or raytune-ft's excludes: .venv, runs, .cache, ...)")
        if given.is_absolute():  # the job's copy of the working directory lies elsewhere
            overrides.append(f"{field}={path.relative_to(working_dir).as_posix()}")
    return overrides


def check_cluster_paths(paths: dict[str, list[Path]], working_dir: Path) -> None:
    """Run folders that ``post`` and ``fuse`` read and write must be the cluster's own: absolute
    paths on the storage its nodes share, never the job's copy of the working directory, which
    goes when the job ends."""
    for where, values in paths.items():
        for path in values:
            if not path.is_absolute() or path.resolve().is_relative_to(working_dir):
                raise UserError(where, f"{path} would be in the job's copy of the working directory, gone when the job ends; "
                                       "give an absolute path on the storage the cluster's nodes share")


def submit(arguments: list[str], address: str | None, working_dir: Path, pip: list[str]) -> tuple[str, str]:
    """Submit ``raytune-ft ARGUMENTS`` as a job, with ``working_dir`` as its current directory;
    returns (address, job id). The caller has checked what the job reads."""
    with job_client(address) as client:
        job_id = submit_when_the_agent_is_up(client, entrypoint=entrypoint(arguments), runtime_env=runtime_env(working_dir, pip),
                                             metadata={"command": arguments[0]})
    return resolve_address(address), job_id


def submit_when_the_agent_is_up(client, wait_s: float = AGENT_WAIT_S, **job) -> str:
    """``client.submit_job(**job)``, retried every 2 s for up to ``wait_s`` while the head answers
    that its job agent is not up yet (a head that has just started, or a loaded one); any other
    failure, or the last one, is raised as itself."""
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(lambda error: isinstance(error, RuntimeError) and NO_AGENT in str(error)),
        wait=tenacity.wait_fixed(2), stop=tenacity.stop_after_delay(wait_s), reraise=True,
        before_sleep=lambda _: logger.warning("the head's job agent is not up yet; trying again"),
    )
    return retrying(client.submit_job, **job)


def stream_logs(address: str | None, job_id: str) -> None:
    """Write the job's logs to stdout as they come, until the job ends."""
    with job_client(address) as client:
        async def tail() -> None:
            async for chunk in client.tail_job_logs(job_id):
                sys.stdout.write(chunk)
                sys.stdout.flush()

        asyncio.run(tail())


def final_status(address: str | None, job_id: str, poll_s: float = 1.0) -> str:
    """Wait for the job to end; return its status, or raise JobFailed unless it SUCCEEDED."""
    with job_client(address) as client:
        while (info := client.get_job_info(job_id)).status.value not in TERMINAL:
            time.sleep(poll_s)
    if info.status.value != "SUCCEEDED":
        message = (info.message or "").strip().splitlines()
        raise JobFailed(f"job {job_id}", info.status.value + (f": {message[0]}" if message else ""))
    return info.status.value


def describe(address: str | None, job_id: str) -> str:
    """One line: the job's status, recipe, entrypoint and message."""
    with job_client(address) as client:
        info = client.get_job_info(job_id)
    message = (info.message or "").strip().splitlines()
    return f"{job_id}  {info.status.value}  {info.entrypoint}" + (f"  ({message[0]})" if message else "")


def logs(address: str | None, job_id: str) -> str:
    with job_client(address) as client:
        return client.get_job_logs(job_id)


def stop(address: str | None, job_id: str) -> bool:
    """Ask the job to stop; False when it had already ended."""
    with job_client(address) as client:
        return client.stop_job(job_id)


def table(address: str | None) -> list[tuple[str, str, str, str]]:
    """(submission id, status, started, entrypoint) of every job, newest first."""
    with job_client(address) as client:
        jobs = sorted(client.list_jobs(), key=lambda job: job.start_time or 0, reverse=True)
    return [(job.submission_id or job.job_id or "-", job.status.value,
             time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000)) if job.start_time else "-",
             job.entrypoint) for job in jobs]
