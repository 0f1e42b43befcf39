"""The job layer on real Ray: a head with token auth on 127.0.0.1, `raytune-ft submit` and plain
`ray job submit`, a two-node training run, and the configs under cluster/.

Every head started here uses its own ports and temp dir and is stopped by killing its own process
group, never with `ray stop` (that would stop other Ray instances on this machine too).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
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
    """The tiny recipe, shortened, in a working directory of its own."""
    tiny_recipe["train"]["epochs"] = 2
    (tmp_path / "project").mkdir()
    return write_recipe(tiny_recipe, tmp_path / "project" / "tiny.yaml")


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
    listing = cli("list", "--address", DASHBOARD, env=env)
    assert listing.returncode == 0 and job_id in listing.stdout
    logs = cli("logs", job_id, "--address", DASHBOARD, env=env)
    assert logs.returncode == 0 and "[raytune-ft] tiny:" in logs.stdout

    written = [result.stdout, result.stderr, status.stdout, listing.stdout, logs.stdout]
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
    if name != "local-autoscale.yaml":  # cloud: GPU workers, token auth on every node, loopback dashboard
        assert all(node["resources"].get("GPU", 0) >= 1 for node in workers.values())
        starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
        assert all("RAY_AUTH_MODE=token ray start" in command for command in starts if "ray start" in command)
        assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
        assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    assert "0.0.0.0" not in json.dumps({k: v for k, v in config.items() if k != "provider"})


def kuberay_clusters() -> list[tuple[str, dict]]:
    cluster = load_yaml(CLUSTER / "kuberay" / "raycluster.yaml")
    job = load_yaml(CLUSTER / "kuberay" / "rayjob.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    return [("raycluster", cluster["spec"]), ("rayjob", job["spec"]["rayClusterSpec"])]


def test_kuberay_manifests_autoscale_with_token_auth_and_no_public_service():
    for name, spec in kuberay_clusters():
        assert spec["authOptions"] == {"mode": "token", "secretName": "raytune-ft-ray-token"}, name
        assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
        assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
        assert spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"].startswith("rayproject/ray:2.60.0")
        for group in spec["workerGroupSpecs"]:
            assert group["groupName"] and group["minReplicas"] == 0 < group["maxReplicas"]
            container = group["template"]["spec"]["containers"][0]
            assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    job = load_yaml(CLUSTER / "kuberay" / "rayjob.yaml")["spec"]
    assert job["entrypoint"].startswith("python -m raytune_ft.cli run jobs/") and job["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    assert runtime_env["working_dir"].endswith(".zip") and runtime_env["pip"]


def test_make_cluster_up_enables_token_auth_on_loopback():
    makefile = (ROOT / "Makefile").read_text()
    up = makefile.split("cluster-up:", 1)[1].split("cluster-down:", 1)[0]
    assert "RAY_AUTH_MODE=token" in up and "--dashboard-host 127.0.0.1" in up
    assert "cluster/local-autoscale.yaml" in up and "ray stop" not in makefile


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
