"""The job layer on real Ray: a head with token auth on 127.0.0.1, `raytune-ft submit` (run, post)
and plain `ray job submit`, a two-node training run; what submit checks before sending anything
(local paths, the address); and the configs under cluster/: what they install, what they expose.

Every head started here uses its own ports and temp dir and is stopped by killing its own process
group, never with `ray stop` (that would stop other Ray instances on this machine too).
"""

from __future__ import annotations

import ast
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, cli, write_recipe

BIN = Path(sys.executable).parent
DASHBOARD = "http://127.0.0.1:8291"
HEAD_START_S = 240  # a loaded 2-core machine has taken over 120 s to bring a head's dashboard up


def start_head(args: list[str], env: dict, log: Path, probe: str, attempts: int = 2) -> subprocess.Popen:
    """`ray start --head --block` in its own process group; returns once ``probe`` answers HTTP,
    the head's dashboard agent (``--dashboard-agent-listen-port``), which takes the jobs, listens,
    and `ray start` has reported the runtime started. On overloaded cores `ray start` can give up
    on its own start-up (its raylet has 30 s to register, not configurable): it is started again."""
    from ray._private.services import get_node_ip_address

    option = dict(zip(args, args[1:]))
    agent = (option.get("--node-ip-address") or get_node_ip_address(), int(option["--dashboard-agent-listen-port"]))
    # The dashboard's own start-up limit (60 s by default) is not enough on loaded cores either.
    env = {**env, "PYTHONUNBUFFERED": "1", "RAY_DASHBOARD_STARTUP_TIMEOUT_S": str(HEAD_START_S)}
    deadline = time.time() + HEAD_START_S * attempts
    for attempt in range(1, attempts + 1):
        head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats", *args],
                                env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        while time.time() < deadline and head.poll() is None:
            if "Ray runtime started" in log.read_text(errors="ignore") and answers(probe) and listens(agent):
                return head
            time.sleep(1)
        stop_head(head)
        if time.time() >= deadline or attempt == attempts:
            break
        log.rename(log.with_suffix(f".attempt{attempt}"))
    raise RuntimeError(f"the head did not come up ({probe}, the agent at {agent}) in {attempt} of {attempts} tries "
                       f"and {HEAD_START_S * attempts} s at most: {log.read_text()[-2000:]}")


def answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
    except urllib.error.HTTPError:  # 401: up, and asking for the token
        return True
    except OSError:
        return False
    return True


def listens(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=2).close()
    except OSError:
        return False
    return True


def stop_head(head: subprocess.Popen) -> None:
    """Stop this head and every process it started (they share its process group)."""
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(head.pid, sig)
            head.wait(grace)
            time.sleep(1)  # workers and agents exit just after the head's `ray start`
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def token_head(tmp_path_factory):
    """A real head on 127.0.0.1 with token auth, its own ports and temp dir; the job driver runs in
    this venv (as on a cluster image that has the project installed)."""
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path_factory.mktemp("head") / "head.log"
    head = start_head(["--node-ip-address", "127.0.0.1", "--port", "6391", "--dashboard-host", "127.0.0.1",
                       "--dashboard-port", "8291", "--ray-client-server-port", "23091", "--dashboard-agent-listen-port", "52391",
                       "--num-cpus", "4", "--object-store-memory", str(300 * 2**20), "--temp-dir", "/tmp/raytune_ft_jobs_test"],
                      env, log, f"{DASHBOARD}/api/version")
    try:
        yield {"address": DASHBOARD, "token": token}
    finally:
        stop_head(head)


def ray_job_submit(args: list[str], env: dict) -> subprocess.CompletedProcess:
    """Plain `ray job submit ARGS`, as a user types it, tried again while the head answers that
    its job agent is not up yet (a head on loaded cores answers before its agent registers;
    `raytune-ft submit` waits for it the same way)."""
    from raytune_ft.jobs import NO_AGENT

    deadline = time.time() + 90
    while True:
        result = subprocess.run([str(BIN / "ray"), "job", "submit", *args], capture_output=True, text=True, timeout=600, env=env)
        if result.returncode == 0 or NO_AGENT not in result.stderr or time.time() > deadline:
            return result
        time.sleep(3)


def client_env(home: Path, **extra: str) -> dict:
    """A client environment with no token but what the test gives (not even ~/.ray/auth_token)."""
    return {"HOME": str(home), "RAY_AUTH_TOKEN": "", **extra}


@pytest.fixture
def job_recipe(tiny_recipe, tmp_path) -> Path:
    """The tiny recipe, shortened, in a working directory of its own that holds its model and data
    (named by absolute paths: submit points the job at their shipped copies)."""
    project = tmp_path / "project"
    shutil.copytree(tiny_recipe["model"]["path"], project / "model")
    (project / "data").mkdir()
    for split in ("train", "test"):
        tiny_recipe["data"][split] = str(shutil.copy(tiny_recipe["data"][split], project / "data" / f"{split}.parquet"))
    tiny_recipe["model"]["path"] = str(project / "model")
    tiny_recipe["train"]["epochs"] = 2
    return write_recipe(tiny_recipe, project / "tiny.yaml")


def test_submit_with_token_file_succeeds_and_never_shows_the_token(token_head, job_recipe, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(token_head["token"] + "\n")
    env = client_env(tmp_path, RAY_AUTH_TOKEN_PATH=str(token_file))
    started = time.perf_counter()
    result = cli("submit", str(job_recipe), "--address", token_head["address"], "--working-dir", str(job_recipe.parent),
                 "--set", "train.seed=3", "--wait", env=env)
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    job_id = result.stdout.split()[1]
    assert result.stdout.startswith(f"submitted {job_id} to {DASHBOARD}")
    assert result.stdout.strip().endswith(f"{job_id} SUCCEEDED")
    print(f"submit --wait to SUCCEEDED: {elapsed:.1f} s")

    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 2 and (run_dir / "model" / "model.safetensors").is_file()
    assert "seed: 3" in (run_dir / "recipe.yaml").read_text()  # --set travelled with the job

    status = cli("status", job_id, "--address", DASHBOARD, env=client_env(tmp_path, RAY_AUTH_TOKEN=token_head["token"]))
    assert status.returncode == 0 and f"{job_id}  SUCCEEDED  python -m raytune_ft.cli run tiny.yaml --set train.seed=3" in status.stdout
    # The model and data went with the working directory; the job read the shipped copies.
    for shipped in ("model.path=model", "data.train=data/train.parquet", "data.test=data/test.parquet"):
        assert f"--set {shipped}" in status.stdout  # absolute paths rewritten to the job's copies
    listing = cli("list", "--address", DASHBOARD, env=env)
    assert listing.returncode == 0 and job_id in listing.stdout
    logs = cli("logs", job_id, "--address", DASHBOARD, env=env)
    assert logs.returncode == 0 and "[raytune-ft] tiny:" in logs.stdout

    # A post step on the finished run, which lives outside the job's working directory (here, the
    # head's own disk stands for the storage a cluster's nodes share).
    post = cli("submit", "--command", "post", str(run_dir), "--step", "quantize", "--set", "post.quantize.latency_batches=2",
               "--address", DASHBOARD, "--working-dir", str(job_recipe.parent), "--wait", env=env)
    assert post.returncode == 0, post.stdout[-3000:] + post.stderr[-3000:]
    assert post.stdout.strip().endswith("SUCCEEDED") and (run_dir / "post" / "quantize.json").is_file()

    written = [result.stdout, result.stderr, status.stdout, listing.stdout, logs.stdout, post.stdout, post.stderr]
    written += [p.read_text(errors="ignore") for p in run_dir.rglob("*") if p.is_file() and p.suffix in {".json", ".jsonl", ".yaml", ".txt", ".log"}]
    assert not any(token_head["token"] in text for text in written)


@pytest.mark.parametrize("token", ["", "not-the-token"], ids=["no_token", "wrong_token"])
def test_submit_without_the_right_token_is_a_one_line_error(token_head, job_recipe, tmp_path, token):
    result = cli("submit", str(job_recipe), "--address", DASHBOARD, "--working-dir", str(job_recipe.parent),
                 env=client_env(tmp_path, RAY_AUTH_TOKEN=token))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    problem = "the token was rejected" if token else "the cluster requires a token and none was sent"
    assert result.stderr.startswith(f"error: {DASHBOARD}: {problem}; set RAY_AUTH_TOKEN")


def test_recipe_errors_are_caught_before_submission(token_head, job_recipe, tmp_path):
    env = client_env(tmp_path, RAY_AUTH_TOKEN=token_head["token"])
    result = cli("submit", str(job_recipe), "--address", DASHBOARD, "--working-dir", str(job_recipe.parent),
                 "--set", "train.lr=-1", env=env)
    assert result.returncode == 2
    assert result.stderr == f"error: {job_recipe}: train.lr: Input should be greater than or equal to 0 (got -1)\n"
    outside = cli("submit", str(job_recipe), "--address", DASHBOARD, "--working-dir", str(tmp_path / "elsewhere"), env=env)
    assert outside.returncode == 2 and outside.stderr.startswith("error: --working-dir:")


def test_unreachable_address_is_a_one_line_error(tmp_path, job_recipe):
    with socket.socket() as closed_port:  # bound but never listening: connections to it are refused
        closed_port.bind(("127.0.0.1", 0))
        address = f"http://127.0.0.1:{closed_port.getsockname()[1]}"
        result = cli("submit", str(job_recipe), "--address", address, "--working-dir", str(job_recipe.parent),
                     env=client_env(tmp_path))
    assert result.returncode == 2
    assert result.stderr == (f"error: --address: cannot reach the Ray dashboard at {address}; is the cluster up, "
                             "and the port tunnelled (ray dashboard cluster.yaml)?\n")


def test_token_mode_without_a_token_is_a_one_line_error(tmp_path, job_recipe):
    """Ray's client refuses before any request when RAY_AUTH_MODE=token and no token is set."""
    result = cli("submit", str(job_recipe), "--address", DASHBOARD, "--working-dir", str(job_recipe.parent),
                 env=client_env(tmp_path, RAY_AUTH_MODE="token"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: RAY_AUTH_MODE: is token but no token was found; set RAY_AUTH_TOKEN")
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_submit_help_shows_how_to_send_a_tune_job():
    result = cli("submit", "--help")
    assert result.returncode == 0 and "raytune-ft submit --command tune jobs/text_classification.yaml" in result.stdout


@pytest.fixture
def project(tmp_path) -> Path:
    """A working directory holding the shipped text recipe, data of its own (one file ignored by
    its .gitignore) and, beside it, data that stays on this machine."""
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "scratch").mkdir()
    shutil.copy(ROOT / "jobs" / "text_classification.yaml", project / "recipe.yaml")
    (project / ".gitignore").write_text("scratch/\n")
    for path in (project / "data" / "train.parquet", project / "scratch" / "train.parquet", tmp_path / "elsewhere.parquet"):
        path.write_bytes(b"PAR1")
    return project


def refused_before_submission(cli_in_process, *args: str) -> str:
    """Run `raytune-ft ARGS` against a dashboard that cannot be reached (so a check that let the
    job through would fail reaching it instead): it must exit 2 with one line, which is returned."""
    with socket.socket() as closed_port:
        closed_port.bind(("127.0.0.1", 0))
        code, stderr = cli_in_process(*args, "--address", f"http://127.0.0.1:{closed_port.getsockname()[1]}")
    assert code == 2 and stderr.count("\n") == 1 and "cannot reach" not in stderr, stderr
    return stderr.removeprefix("error: ").rstrip("\n")


def test_local_paths_the_cluster_would_not_find_are_refused_before_submission(project, cli_in_process):
    """A data path that exists here outside the working directory, in data.* or in a retention
    reference's data, or one inside it that .gitignore keeps from shipping: one line naming the
    field, before anything is sent."""
    outside, recipe, wd = project.parent / "elsewhere.parquet", str(project / "recipe.yaml"), str(project)
    for field, value in (("data.train", str(outside)), ("retention.references.0.data.test", str(outside)),
                         ("data.validation", "../elsewhere.parquet")):
        message = refused_before_submission(cli_in_process, "submit", recipe, "--working-dir", wd, "--set", f"{field}={value}")
        assert message.startswith(f"{field}: {value} is on this machine only, outside the working directory {project} "
                                  "that ships with the job; move it into the working directory (Ray uploads a working "
                                  "directory of at most 512 MiB zipped)"), message
    message = refused_before_submission(cli_in_process, "submit", recipe, "--working-dir", wd, "--set", "data.train=scratch/train.parquet")
    assert message.startswith("data.train: scratch/train.parquet is in the working directory but left out of what ships")


@pytest.mark.parametrize("args, message", [
    (["--command", "post", "runs/text_classification", "--step", "quantize"],
     "RUN_DIR: runs/text_classification would be in the job's copy of the working directory, gone when the job ends"),
    (["--command", "fuse", "/shared/runs/a", "/shared/runs/b", "--output", "fused"], "--output: fused would be in the job's copy"),
    (["--command", "tune", "recipe.yaml"], "tune: the recipe has no tune: section (the search space); see docs/tuning.md"),
], ids=["post_relative_run", "fuse_relative_output", "tune_without_a_space"])
def test_submitted_commands_are_checked_before_submission(args, message, project, cli_in_process, monkeypatch):
    monkeypatch.chdir(project)
    assert refused_before_submission(cli_in_process, "submit", *args).startswith(message)


def test_plain_http_to_another_machine_is_refused_before_any_request(cli_in_process, monkeypatch):
    """No Jobs client is made for it (192.0.2.1, a documentation address, would not answer)."""
    import ray.job_submission

    def no_client(*_, **__):
        raise AssertionError("a Jobs client was made for plain HTTP to another machine")

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", no_client)
    code, stderr = cli_in_process("status", "raysubmit_x", "--address", "http://192.0.2.1:8265")
    assert code == 2
    assert stderr.startswith("error: --address: http://192.0.2.1:8265 is plain HTTP to another machine, which would carry "
                             "the cluster's token readable; reach the dashboard through an SSH tunnel") and stderr.count("\n") == 1


def submitted(monkeypatch, *args: str) -> list[str]:
    """The `raytune-ft` arguments a job would run for `raytune-ft submit ARGS` (nothing is sent)."""
    from raytune_ft import cli, jobs

    sent = []
    monkeypatch.setattr(jobs, "submit", lambda arguments, address, working_dir, pip: sent.append(arguments) or (address, "raysubmit_x"))
    monkeypatch.setattr(sys, "argv", ["raytune-ft", "submit", *args, "--address", "http://127.0.0.1:1"])
    cli.main()
    return sent[0]


def test_each_command_reaches_the_job_as_given_with_paths_as_the_job_sees_them(project, monkeypatch):
    """Submit parses ARGS with the command's own parser and rebuilds them for the job: the recipe
    and its data inside the working directory become the paths of their shipped copies (the job
    runs in its copy of the working directory), everything else is as given."""
    monkeypatch.chdir(project.parent)  # not the working directory: paths are not taken from here
    recipe = str(project / "recipe.yaml")
    assert submitted(monkeypatch, recipe, "--working-dir", str(project), "--set", "train.epochs=1", "--workers", "2", "--resume",
                     "--set", f"data.train={project / 'data' / 'train.parquet'}") == [
        "run", "recipe.yaml", "--set", "train.epochs=1", "--set", f"data.train={project / 'data' / 'train.parquet'}",
        "--set", "data.train=data/train.parquet", "--workers", "2", "--resume"]
    assert submitted(monkeypatch, "--command", "fuse", "/shared/a", "/shared/b", "--tune", "/shared/search", "--top", "2",
                     "--output", "/shared/fused", "--no-soups", "--working-dir", str(project)) == [
        "fuse", "/shared/a", "/shared/b", "--tune", "/shared/search", "--top", "2", "--output", "/shared/fused", "--no-soups"]
    assert submitted(monkeypatch, "--command", "post", "/shared/a", "--step", "prune", "--set", "post.prune.sparsity=0.7",
                     "--working-dir", str(project)) == ["post", "/shared/a", "--step", "prune", "--set", "post.prune.sparsity=0.7"]


NODE_LOSS_RUN = """
import json, sys, threading, time
from pathlib import Path
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors
from raytune_ft import load_recipe
from raytune_ft import run
from raytune_ft.train.faults import FAULT_MARKER

# A head with no CPUs (driver and Train controller only) and three 1-CPU machines: the 2 workers
# land on two of them, and after one is lost the third takes the restarted worker.
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 0, "gcs_server_port": 6393, "dashboard_port": 8293, "dashboard_agent_listen_port": 52394})
machines = [cluster.add_node(num_cpus=1, dashboard_agent_listen_port=52395 + i) for i in range(3)]
cluster.wait_for_nodes()
recipe = load_recipe(sys.argv[1])
marker = recipe.run_dir() / FAULT_MARKER
removed = []

def remove_the_stalled_workers_machine():
    while not marker.exists():
        time.sleep(0.2)
    node_id = marker.read_text()
    machine = next(machine for machine in machines if machine.node_id == node_id)
    cluster.remove_node(machine, allow_graceful=False)  # raylet, object store and worker processes die
    removed.append(node_id)

threading.Thread(target=remove_the_stalled_workers_machine, daemon=True).start()
try:
    run(recipe, address=cluster.address)
    alive = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True, raise_on_missing_output=False)
    print(json.dumps({"removed": removed, "alive": alive, "head": cluster.head_node.node_id,
                      "machines": [machine.node_id for machine in machines], "worker_nodes": [w.node_id for w in workers]}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


@pytest.mark.ray  # a multi-node cluster of its own
def test_losing_a_machine_mid_epoch_restarts_on_the_remaining_machines(tiny_recipe, tmp_path):
    """Three 1-CPU machines and a CPU-less head: the 2 training workers land one per machine.
    Checkpoints go to output.storage_path (the stand-in for S3/GCS). A worker's whole machine is
    removed mid-epoch 2 (its raylet, object store and processes gone, as when a cloud VM is
    preempted): with train.max_failures the worker group restarts on the machines left, from
    epoch 1's checkpoint on the shared storage, and the run finishes with each epoch once; the
    outputs are copied to the shared storage at the end."""
    tiny_recipe["train"].update(epochs=2, max_failures=1)
    tiny_recipe["output"]["storage_path"] = str(tmp_path / "shared")
    recipe = write_recipe(tiny_recipe, tmp_path / "tiny.yaml")
    # RAY_TMPDIR keeps this cluster's sessions and address file away from other Ray instances here.
    env = {**os.environ, "RAY_TMPDIR": "/tmp/rtft_nodeloss", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAYTUNE_FT_FAULT": "stall_at_step:25"}  # 20 steps per epoch
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run([sys.executable, "-c", NODE_LOSS_RUN, str(recipe)], capture_output=True, text=True,
                            timeout=600, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    nodes = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(nodes["removed"]) == 1 and nodes["removed"][0] not in nodes["alive"] and len(nodes["alive"]) == 3
    # Both worker groups (4 workers) ran on the machines only, and the restarted one used the third.
    assert len(nodes["worker_nodes"]) >= 4 and set(nodes["worker_nodes"]) == set(nodes["machines"])

    shared, local = tmp_path / "shared" / "run", tmp_path / "run"
    summary = json.loads((local / "summary.json").read_text())
    assert summary["resumed_at"] == [{"epoch": 1, "step": 20}]
    rows = [json.loads(line) for line in (local / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows if "train/loss" in row] == [1, 2]
    assert summary["test"]["count"] == 96  # evaluation after the loss still sees every row once
    assert list(shared.glob("checkpoint_*/trainer_state.json")) and not list(local.glob("checkpoint_*"))
    assert (shared / "summary.json").read_text() == (local / "summary.json").read_text()
    assert (shared / "model" / "model.safetensors").is_file() and summary["outputs"]["checkpoints"] == str(shared)


def test_shared_storage_run_is_never_overwritten(tiny_recipe, tmp_path):
    (tmp_path / "shared" / "run" / "checkpoint_000000").mkdir(parents=True)
    tiny_recipe["output"]["storage_path"] = str(tmp_path / "shared")
    result = cli("run", str(write_recipe(tiny_recipe, tmp_path / "tiny.yaml")))
    assert result.returncode == 2
    assert result.stderr == (f"error: output.storage_path: {tmp_path / 'shared' / 'run'} already holds a run; "
                             "pass --resume to continue it, or give the run another output.dir name\n")


CLUSTER = ROOT / "cluster"
LAUNCHER_CONFIGS = ["local-autoscale.yaml", "aws.yaml", "gcp.yaml"]
CLOUD_CONFIGS = ["aws.yaml", "gcp.yaml"]
KUBERAY_MANIFESTS = ["raycluster.yaml", "rayjob.yaml"]
IMAGE_PLACEHOLDER = "YOUR_REGISTRY/raytune-ft:TAG"  # the KubeRay image, built from cluster/Dockerfile


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_validates_against_rays_schema(name):
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = load_yaml(CLUSTER / name)
    jsonschema.validate(config, schema)
    workers = {key: node for key, node in config["available_node_types"].items() if key != config["head_node_type"]}
    assert workers and all(node["min_workers"] == 0 and node["max_workers"] >= 1 for node in workers.values())
    assert config["idle_timeout_minutes"] > 0
    if name in CLOUD_CONFIGS:  # GPU workers, token auth on every node, loopback dashboard
        assert all(node["resources"].get("GPU", 0) >= 1 for node in workers.values())
        starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
        assert all("RAY_AUTH_MODE=token ray start" in command for command in starts if "ray start" in command)
        assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
        assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "0.0.0.0" not in json.dumps(config)


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def installs(commands: str) -> set[str]:
    """What a config's or image's shell commands install: the project from the repository (every
    dependency pyproject.toml declares), DeepSpeed at the project's pin, the offline assets."""
    found = set()
    if re.search(r"pip install (-\S+ )*(~|\$HOME)/raytune_ft(\s|$)", commands):
        found.add("project")
    if re.search(r'DS_BUILD_OPS=0 python -m pip install (-\S+ )*--no-build-isolation (-\S+ )*"\$HOME/raytune_ft\[deepspeed\]"', commands):
        found.add("deepspeed")
    if "python -m raytune_ft.data.assets install" in commands:
        found.add("assets")
    return found


@pytest.mark.parametrize("name", CLOUD_CONFIGS)
def test_every_cloud_node_installs_the_project_deepspeed_and_the_assets(name):
    config = load_yaml(CLUSTER / name)
    assert installs("\n".join(config["setup_commands"])) == {"project", "deepspeed", "assets"}
    assert config["file_mounts"]["~/raytune_ft"] == "." and ".gitignore" in config["rsync_filter"]
    # Ray's image at the project's Ray and Python: the project needs Python >= 3.11.
    ray_pin = next(dep for dep in pyproject()["project"]["dependencies"] if dep.startswith("ray["))
    assert config["docker"]["image"] == f"rayproject/ray:{ray_pin.split('==')[1]}-py311-gpu"
    assert pyproject()["project"]["requires-python"] == ">=3.11"


def test_the_kuberay_image_installs_the_same_and_the_manifests_run_it():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    aws = load_yaml(CLUSTER / "aws.yaml")
    assert f"FROM {aws['docker']['image']}\n" in dockerfile
    assert installs(dockerfile.replace("\\\n", " ")) == {"project", "deepspeed", "assets"}
    assert IMAGE_PLACEHOLDER in dockerfile
    for name, spec in kuberay_clusters():
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        assert {group["template"]["spec"]["containers"][0]["image"] for group in groups} == {IMAGE_PLACEHOLDER}, name
    # The build context holds only what installing the project reads.
    assert (ROOT / ".dockerignore").read_text().split("\n")[1:5] == ["*", "!pyproject.toml", "!README.md", "!raytune_ft"]


def test_make_install_and_the_local_cluster_install_the_same():
    """make install (which the local cluster's fake nodes run from: make cluster-up needs it)
    installs the project, DeepSpeed at pyproject.toml's pin and the assets by the one command."""
    makefile = (ROOT / "Makefile").read_text()
    install = makefile.split("$(STAMP):", 1)[1].split("\ninstall:", 1)[0]
    assert "$(PIP) install -q -e '.[dev]'" in install and "$(PY) -m raytune_ft.data.assets install" in install
    assert install.split("\n")[0].split() == ["pyproject.toml", "raytune_ft/data/assets.py"]  # reinstalls when either changes
    deepspeed_pin = pyproject()["project"]["optional-dependencies"]["deepspeed"]
    assert f"DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation {deepspeed_pin[0]}" in install
    assert makefile.split("\ncluster-up:", 1)[1].split("\n")[0].split() == ["$(STAMP)", "cluster-token"]


def test_every_asset_package_the_code_reads_is_in_the_one_list():
    """The code reaches asset packages only through _package_dir (wheels) and _debian (Debian
    packages): every name it passes is in the list, every entry is used, and nothing else names
    the wheels to install them."""
    from raytune_ft.data.assets import ASSET_DEBS, ASSET_WHEELS

    named = {"_package_dir": set(), "_debian": set()}
    for path in [*(ROOT / "raytune_ft").rglob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in named:
                named[getattr(node.func, "attr", getattr(node.func, "id", None))].add(ast.literal_eval(node.args[0]))
    assert named["_package_dir"] == set(ASSET_WHEELS) and named["_debian"] == set(ASSET_DEBS)
    installers = [ROOT / "Makefile", CLUSTER / "Dockerfile", *CLUSTER.rglob("*.yaml"), *CLUSTER.glob("*.sh")]
    for requirement in ASSET_WHEELS.values():
        assert not [path.name for path in installers if requirement.split("==")[0] in path.read_text()], requirement


def test_the_asset_install_installs_only_what_is_missing(monkeypatch, tmp_path, capsys):
    from raytune_ft.data import assets

    ran = []
    monkeypatch.setattr(assets.subprocess, "run", lambda command, **_: ran.append(command) or subprocess.CompletedProcess(command, 0))
    monkeypatch.setattr(assets.os, "geteuid", lambda: 1000)  # not root: apt-get through sudo
    monkeypatch.setattr(assets.shutil, "which", lambda name: f"/usr/bin/{name}")
    present, missing = tmp_path / "present", tmp_path / "missing"
    present.mkdir()
    monkeypatch.setattr(assets, "ASSET_WHEELS", {"pytest": f"pytest=={pytest.__version__}", "absent_wheel": "absent-wheel==1.0"})
    monkeypatch.setattr(assets, "ASSET_DEBS", {"present-deb": present, "missing-deb": missing})
    assets.install()
    assert ran == [[sys.executable, "-m", "pip", "install", "-q", "--no-deps", "absent-wheel==1.0"],
                   ["sudo", "apt-get", "update", "-qq"],
                   ["sudo", "apt-get", "install", "-y", "-qq", "--no-install-recommends", "missing-deb"]]
    assert capsys.readouterr().out == "[raytune-ft] asset packages: installed absent-wheel==1.0, missing-deb\n"
    ran.clear()
    monkeypatch.setattr(assets, "ASSET_WHEELS", {"pytest": f"pytest=={pytest.__version__}"})
    monkeypatch.setattr(assets, "ASSET_DEBS", {"present-deb": present})
    assets.install()
    assert ran == [] and capsys.readouterr().out == "[raytune-ft] asset packages: all installed\n"


def ssh_open_to_the_world(config: dict) -> str | None:
    """Why a cloud launcher config would admit SSH from anywhere, or None."""
    text = json.dumps(config)
    if "0.0.0.0/0" in text or "::/0" in text:
        return "a rule names the whole internet"
    node_configs = [node["node_config"] for node in config["available_node_types"].values()]
    if config["provider"]["type"] == "aws" and not all("SecurityGroupIds" in node for node in node_configs):
        return "Ray's AWS launcher creates a security group, and adds SSH from 0.0.0.0/0 to it"
    if config["provider"]["type"] == "gcp" and not all("networkInterfaces" in node and node.get("tags") for node in node_configs):
        return "Ray's GCP launcher uses the default network, whose rules admit SSH from anywhere"
    return None


def test_no_cloud_config_opens_ssh_to_the_world():
    for name in CLOUD_CONFIGS:
        assert ssh_open_to_the_world(load_yaml(CLUSTER / name)) is None, name
    aws, gcp = load_yaml(CLUSTER / "aws.yaml"), load_yaml(CLUSTER / "gcp.yaml")
    # As aws.yaml was: the launcher's own group with a rule for the world.
    world = {**aws, "provider": {**aws["provider"], "security_group": {"GroupName": "raytune-ft", "IpPermissions": [
        {"FromPort": 22, "ToPort": 22, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}}}
    assert ssh_open_to_the_world(world) == "a rule names the whole internet"
    # A narrow rule is not enough when the launcher creates the group: Ray adds 0.0.0.0/0 to it.
    world["provider"]["security_group"]["IpPermissions"][0]["IpRanges"] = [{"CidrIp": "203.0.113.0/24"}]
    for node in world["available_node_types"].values():
        node["node_config"] = {key: value for key, value in node["node_config"].items() if key != "SecurityGroupIds"}
    assert ssh_open_to_the_world(world).startswith("Ray's AWS launcher")
    default_network = {**gcp, "available_node_types": {key: {**node, "node_config": {
        k: v for k, v in node["node_config"].items() if k != "networkInterfaces"}} for key, node in gcp["available_node_types"].items()}}
    assert ssh_open_to_the_world(default_network).startswith("Ray's GCP launcher")
    # Every GCP node is on the raytune-ft network with the tag its firewall rules name.
    for node in gcp["available_node_types"].values():
        assert node["node_config"]["networkInterfaces"][0]["subnetwork"].endswith("/subnetworks/raytune-ft")
        assert node["node_config"]["tags"] == {"items": ["raytune-ft"]}


def network_script(tmp_path: Path, cloud: str, **env: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """cluster/network.sh with stand-in aws and gcloud commands that record their arguments."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.jsonl"
    bin_dir.mkdir(exist_ok=True)
    for tool, answer in (("aws", "sg-0123"), ("gcloud", "")):
        (bin_dir / tool).write_text(f"#!{sys.executable}\nimport json, sys\n"
                                    f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\nprint({answer!r})\n")
        (bin_dir / tool).chmod(0o755)
    result = subprocess.run(["bash", str(CLUSTER / "network.sh"), cloud], capture_output=True, text=True, timeout=60,
                            env={"PATH": f"{bin_dir}:/usr/bin:/bin", **env})
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    log.unlink(missing_ok=True)
    return result, calls


def test_the_network_script_admits_ssh_from_the_given_range_and_the_rest_between_nodes(tmp_path):
    result, calls = network_script(tmp_path, "aws", SSH_CIDR="203.0.113.0/24")
    assert result.returncode == 0 and result.stdout == "sg-0123\n", result.stderr
    ingress = next(call for call in calls if call[:2] == ["ec2", "authorize-security-group-ingress"])
    assert ingress[ingress.index("--ip-permissions") + 1:] == [
        "IpProtocol=tcp,FromPort=22,ToPort=22,IpRanges=[{CidrIp=203.0.113.0/24}]", "IpProtocol=-1,UserIdGroupPairs=[{GroupId=sg-0123}]"]

    result, calls = network_script(tmp_path, "gcp", SSH_CIDR="203.0.113.0/24", GCP_PROJECT="p")
    assert result.returncode == 0, result.stderr
    rules = {call[3]: call for call in calls if call[:3] == ["compute", "firewall-rules", "create"]}
    assert set(rules) == {"raytune-ft-internal", "raytune-ft-ssh"}
    for name, source, ports in (("raytune-ft-internal", ["--source-tags", "raytune-ft"], "all"),
                                ("raytune-ft-ssh", ["--source-ranges", "203.0.113.0/24"], "tcp:22")):
        rule = rules[name]
        assert rule[rule.index(source[0]):rule.index(source[0]) + 2] == source and rule[rule.index("--rules") + 1] == ports
        assert rule[rule.index("--target-tags") + 1] == "raytune-ft" and rule[rule.index("--network") + 1] == "raytune-ft"

    for env in ({}, {"SSH_CIDR": "0.0.0.0/0"}, {"SSH_CIDR": "::/0"}):
        result, calls = network_script(tmp_path, "aws", **env)
        assert result.returncode != 0 and "SSH_CIDR" in result.stderr and calls == [], env


def kuberay_documents(name: str) -> dict[str, dict]:
    """kind -> document of a KubeRay manifest file."""
    return {document["kind"]: document for document in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text())}


def kuberay_clusters() -> list[tuple[str, dict]]:
    cluster = kuberay_documents("raycluster.yaml")["RayCluster"]
    job = kuberay_documents("rayjob.yaml")["RayJob"]
    assert cluster["apiVersion"] == job["apiVersion"] == "ray.io/v1"
    return [("raycluster", cluster["spec"]), ("rayjob", job["spec"]["rayClusterSpec"])]


def test_kuberay_manifests_autoscale_with_token_auth_and_no_public_service():
    for name, spec in kuberay_clusters():
        assert spec["authOptions"] == {"mode": "token", "secretName": "raytune-ft-ray-token"}, name
        assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
        assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
        for group in spec["workerGroupSpecs"]:
            assert group["groupName"] and group["minReplicas"] == 0 < group["maxReplicas"]
            container = group["template"]["spec"]["containers"][0]
            assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    job = kuberay_documents("rayjob.yaml")["RayJob"]["spec"]
    assert job["entrypoint"].startswith("python -m raytune_ft.cli run jobs/") and job["shutdownAfterJobFinishes"] is True
    # A failed driver is retried on a new cluster, and resumes from the storage the last one wrote.
    assert job["backoffLimit"] >= 1
    assert "--resume-or-start" in job["entrypoint"].split() and "output.storage_path=s3://" in job["entrypoint"]
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    assert runtime_env == {"working_dir": runtime_env["working_dir"]} and runtime_env["working_dir"].endswith(".zip")


@pytest.mark.parametrize("name", KUBERAY_MANIFESTS)
def test_kuberay_network_policy_admits_only_the_clusters_own_pods(name):
    """Each manifest comes with a NetworkPolicy on every pod of its cluster: one rule admits the
    cluster's own pods (every port), the other only the dashboard's port, from the KubeRay operator
    and (a RayJob) its submitter; nothing admits an address range or everyone."""
    documents = kuberay_documents(name)
    policy, (_, spec) = documents["NetworkPolicy"], kuberay_clusters()[KUBERAY_MANIFESTS.index(name)]
    assert policy["apiVersion"] == "networking.k8s.io/v1" and policy["spec"]["policyTypes"] == ["Ingress"]
    own = policy["spec"]["podSelector"]["matchLabels"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        assert own.items() <= group["template"]["metadata"]["labels"].items(), group.get("groupName", "head")
    intra, dashboard = policy["spec"]["ingress"]
    assert intra == {"from": [{"podSelector": {"matchLabels": own}}]}
    assert dashboard["ports"] == [{"protocol": "TCP", "port": 8265}]
    peers = [peer["podSelector"]["matchLabels"] for peer in dashboard["from"]]
    assert {"app.kubernetes.io/name": "kuberay-operator"} in peers
    if "RayJob" in documents:  # the submitter: the Kubernetes Job named after the RayJob
        assert {"batch.kubernetes.io/job-name": documents["RayJob"]["metadata"]["name"]} in peers
    assert all(set(peer) <= {"podSelector", "namespaceSelector"} and peer["podSelector"]["matchLabels"]
               for rule in policy["spec"]["ingress"] for peer in rule["from"])


def test_make_cluster_up_enables_token_auth_on_loopback():
    makefile = (ROOT / "Makefile").read_text()
    up = makefile.split("cluster-up:", 1)[1].split("cluster-down:", 1)[0]
    assert "RAY_AUTH_MODE=token" in up and "--dashboard-host 127.0.0.1" in up
    assert "cluster/local-autoscale.yaml" in up and "ray stop" not in makefile


def test_make_cluster_token_writes_a_token_only_its_owner_reads(tmp_path):
    """`ray get-auth-token --generate` writes with the umask (0644 here); make cluster-token
    writes 0600, and makes an existing token 0600 without changing it."""
    def make_token() -> None:
        result = subprocess.run(["make", "-s", "-C", str(ROOT), "cluster-token", f"VENV={BIN.parent}"], capture_output=True,
                                text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path), "RAY_AUTH_TOKEN": ""})
        assert result.returncode == 0, result.stderr

    token = tmp_path / ".ray" / "auth_token"
    make_token()
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text().strip()) >= 32
    written = token.read_text()
    token.chmod(0o644)
    make_token()
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and token.read_text() == written


def test_torch_is_one_whose_weights_only_loading_runs_no_code():
    from packaging.requirements import Requirement

    torch = next(Requirement(dep) for dep in pyproject()["project"]["dependencies"] if dep.startswith("torch"))
    assert "2.10.0" in torch.specifier and "2.9.1" not in torch.specifier  # CVE-2025-32434 was fixed in 2.6


def alive_worker_nodes(token: str, dashboard: str) -> int:
    request = urllib.request.Request(f"{dashboard}/api/v0/nodes?limit=100", headers={"Authorization": f"Bearer {token}"})
    nodes = json.loads(urllib.request.urlopen(request, timeout=10).read())["data"]["result"]["result"]
    return sum(1 for node in nodes if node["state"] == "ALIVE" and not node["is_head_node"])


@pytest.mark.slow
@pytest.mark.ray  # an autoscaling cluster of its own
def test_local_autoscaling_cluster_scales_up_for_a_job_and_back_down(tiny_recipe, tmp_path):
    """cluster/local-autoscale.yaml (on its own ports): no worker nodes at first; a 2-worker job,
    submitted with plain `ray job submit -- raytune-ft run` as a user types it, makes the
    autoscaler add nodes, the job succeeds, and the idle nodes leave again."""
    from ray._private.services import get_node_ip_address

    config = load_yaml(CLUSTER / "local-autoscale.yaml")
    config["provider"]["gcs_address"] = f"{get_node_ip_address()}:6394"
    (tmp_path / "autoscale.yaml").write_text(json.dumps(config))
    token, dashboard = secrets.token_hex(32), "http://127.0.0.1:8294"
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "RAY_TMPDIR": "/tmp/rtft_scale", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    head = start_head(["--num-cpus", "0", "--port", "6394", "--dashboard-host", "127.0.0.1", "--dashboard-port", "8294",
                       "--ray-client-server-port", "23094", "--dashboard-agent-listen-port", "52394",
                       "--autoscaling-config", str(tmp_path / "autoscale.yaml")], env, tmp_path / "head.log", f"{dashboard}/api/version")
    try:
        assert alive_worker_nodes(token, dashboard) == 0
        tiny_recipe["train"]["epochs"] = 1
        recipe = write_recipe(tiny_recipe, tmp_path / "tiny.yaml")
        started = time.perf_counter()
        # No working_dir upload: fake nodes share one temp dir, and one node's cleanup would delete
        # the unpacked directory under another's workers. The project is installed on every "node".
        result = ray_job_submit(["--address", dashboard, "--", "raytune-ft", "run", str(recipe)], {**env, "HOME": str(tmp_path)})
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "succeeded" in result.stdout.lower()
        print(f"autoscaled job SUCCEEDED after {time.perf_counter() - started:.0f} s")
        assert alive_worker_nodes(token, dashboard) >= 2  # the two training workers needed a node each
        assert (tmp_path / "run" / "summary.json").is_file()
        idle_since = time.perf_counter()
        while alive_worker_nodes(token, dashboard) and time.perf_counter() - idle_since < 180:
            time.sleep(5)
        assert alive_worker_nodes(token, dashboard) == 0
        print(f"worker nodes gone {time.perf_counter() - idle_since:.0f} s after the job")
    finally:
        stop_head(head)


def test_submit_waits_for_a_head_whose_job_agent_is_not_up_yet():
    """The head answers 500 "No available agent ... try again later" until its agent registers:
    submit tries again for a while; any other failure is raised at once."""
    from raytune_ft.jobs import NO_AGENT, submit_when_the_agent_is_up

    class Head:
        def __init__(self, failures: list[str]):
            self.failures, self.calls = failures, 0

        def submit_job(self, **job):
            self.calls += 1
            if self.failures:
                raise RuntimeError(f"Request failed with status code 500: {self.failures.pop(0)}")
            return f"raysubmit_{job['entrypoint']}"

    starting = Head([f"{NO_AGENT}, please try again later.", f"{NO_AGENT}, please try again later."])
    assert submit_when_the_agent_is_up(starting, entrypoint="x") == "raysubmit_x" and starting.calls == 3
    broken = Head(["Internal error", "unreachable"])
    with pytest.raises(RuntimeError, match="Internal error"):
        submit_when_the_agent_is_up(broken, entrypoint="x")
    assert broken.calls == 1
    never = Head([f"{NO_AGENT}, please try again later."] * 3)
    with pytest.raises(RuntimeError, match=NO_AGENT):
        submit_when_the_agent_is_up(never, wait_s=0.0, entrypoint="x")
