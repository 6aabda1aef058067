"""Running on Ray clusters: the configs in cluster/, joining, multi-node behaviour, autoscaling.

* Every cluster launcher YAML validates against Ray's own autoscaler schema (and Ray's own
  `prepare_config` + `validate_config`); every KubeRay manifest parses and names images, resources and
  (RayJob) an entrypoint; the runtime env builds.
* Bad input is one line and exit 2: an address where nothing answers; resources no node type can ever
  provide and a client without the cluster's token (in the autoscaling test, on its cluster). min > max
  workers: tests/train/test_elastic.py (message) and tests/test_bad_inputs.py (command line).
* Multi-node (`ray.cluster_utils.Cluster`, 1-CPU nodes, a head without CPUs): the two training workers
  run on different nodes, each reading its own disjoint slice of the shards; a node removed mid-run
  leaves the elastic run ([1, 2] workers) to finish on one worker from the last checkpoint; a rollout
  actor whose node goes is restarted on another node and no row is lost.
* Autoscaling (Ray's fake multi-node provider, autoscaler v2, cluster/local-fake.yaml): a job needing
  more than the head has waits (progress lines) while the autoscaler adds nodes, completes, and the
  idle nodes go; token authentication is on: a driver with the token joins, one without is refused.

Tests that start their own Ray cluster run it in a separate process group with a private RAY_TMPDIR
(never /tmp/ray, so no other Ray user on the machine sees it) and 127.0.0.1 node addresses; the
multi-node one runs this file as a script (`python tests/test_cluster.py multinode ...`), so they
never meet the session's `ray_session`.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the script mode has no conftest
    sys.path.insert(0, str(REPO))
CLUSTER = REPO / "cluster"
TINY = REPO / "configs" / "tiny.yaml"
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
FAKE_HEAD_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"

LAUNCHER_YAMLS = sorted(p for p in CLUSTER.glob("*.yaml") if "cluster_name" in yaml.safe_load(p.read_text()))
KUBERAY_YAMLS = sorted((CLUSTER / "kuberay").glob("*.yaml"))


# ----------------------------------------------------------------------------------------- configs


def test_cluster_folder_has_every_config():
    names = {p.name for p in LAUNCHER_YAMLS} | {f"kuberay/{p.name}" for p in KUBERAY_YAMLS}
    assert {"aws.yaml", "gcp.yaml", "local-fake.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml"} <= names
    readme = (CLUSTER / "README.md").read_text()
    for needle in (
        "ray up",
        "ray job submit",
        "genpt-dist pipeline",
        "kubectl apply",
        "AWS_ENDPOINT_URL_S3",
        "RAY_AUTH_MODE",
        "--address",
    ):
        assert needle in readme, needle


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_yaml_validates_against_ray_schema(path):
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(path.read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)  # the file as written
    validate_config(prepare_config(copy.deepcopy(raw)))  # as `ray up` / the autoscaler read it

    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    workers = {name: t for name, t in types.items() if t is not head}
    assert head["resources"].get("CPU") == 0  # the driver's node takes no training workers
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= raw["max_workers"], name
    if path.name == "local-fake.yaml":
        return
    assert {"cpu", "gpu"} <= set(workers)
    setups = [
        raw["setup_commands"],
        *(t["worker_setup_commands"] for t in workers.values() if "worker_setup_commands" in t),
    ]
    assert all(any("-e ~/genpt-dist" in c for c in cmds) for cmds in setups)  # the package on every node
    assert raw["file_mounts"]["~/genpt-dist"] == "."
    starts = " ".join(raw["head_start_ray_commands"] + raw["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2 and "RAY_enable_autoscaler_v2=1" in starts
    if raw["provider"]["type"] == "aws":  # S3 through instance profiles, no keys
        assert all("instance-profile/" in t["node_config"]["IamInstanceProfile"]["Arn"] for t in types.values())
    else:
        assert all(t["node_config"]["serviceAccounts"] for t in types.values())


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


@pytest.mark.parametrize("path", KUBERAY_YAMLS, ids=lambda p: p.name)
def test_kuberay_manifest_names_image_entrypoint_and_resources(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs and all(d["apiVersion"] == "ray.io/v1" for d in docs)
    for doc in docs:
        assert doc["kind"] in ("RayCluster", "RayJob")
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2"
        assert spec["authOptions"]["mode"] == "token"
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        for pod in pods:
            for c in _containers(pod):
                assert c["image"] and ":" in c["image"], c["name"]
                for kind in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(c["resources"][kind]), (c["name"], kind)
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        assert set(groups) == {"cpu", "gpu"}
        for g in groups.values():
            assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert all("nvidia.com/gpu" in c["resources"]["limits"] for c in _containers(groups["gpu"]["template"]))
        if doc["kind"] == "RayJob":
            job = doc["spec"]
            assert job["entrypoint"].startswith("genpt-dist pipeline ") and "--address auto" in job["entrypoint"]
            assert job["shutdownAfterJobFinishes"] is True
            runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
            assert set(runtime_env) <= {"env_vars", "pip", "py_modules", "working_dir"}
            from genpt_dist.cli import build_parser

            argv = job["entrypoint"].replace("'", "").split()[1:]
            args = build_parser().parse_args(argv)  # the entrypoint is a valid command line
            assert args.command == "pipeline" and args.address == "auto"


def test_runtime_env_builds():
    from ray.runtime_env import RuntimeEnv

    env = RuntimeEnv(**yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text()))
    assert ".venv/" in env["excludes"] and all(isinstance(v, str) for v in env["env_vars"].values())


def test_job_runtime_env_ships_the_package_unless_the_job_does(monkeypatch):
    from genpt_dist import raycluster

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    env = raycluster.job_runtime_env()
    assert env["py_modules"] == [str(REPO / "genpt_dist")]
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://x.zip"}}))
    assert raycluster.job_runtime_env() is None
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": {"A": "1"}}}))
    assert raycluster.job_runtime_env() is not None


# --------------------------------------------------------------------------------------- bad input


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "launch.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )


def _one_line_error(proc: subprocess.CompletedProcess, expect: str, context: str = "") -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("genpt-dist: error:") and expect in last, f"{last}\n{context}"
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def tiny_data(tiny_corpus, tmp_path_factory) -> str:
    from genpt_dist.config import load_config
    from genpt_dist.data.prepare import prepare

    out = str(tmp_path_factory.mktemp("data") / "tiny")
    prepare([str(tiny_corpus)], out, load_config(TINY).data)
    return out


def test_address_that_does_not_answer_is_refused_quickly(tiny_data, tiny_corpus, tmp_path):
    from genpt_dist.errors import UserError
    from genpt_dist.raycluster import probe

    address = f"127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    proc = _cli(
        "pretrain",
        "--data",
        tiny_data,
        "--run",
        str(tmp_path / "run"),
        "--config",
        str(TINY),
        "--address",
        address,
        timeout=120,
    )
    _one_line_error(proc, f"no Ray cluster answers at {address}")
    assert time.monotonic() - t0 < 60
    run = tmp_path / "pipeline"  # the pipeline asks before it spends minutes preparing data
    proc = _cli(
        "pipeline",
        "--input",
        str(tiny_corpus),
        "--run",
        str(run),
        "--config",
        str(TINY),
        "--address",
        address,
        timeout=120,
    )
    _one_line_error(proc, f"no Ray cluster answers at {address}")
    assert not (run / "data").exists()
    client = f"ray://127.0.0.1:{_free_port()}"  # a Ray Client address (ray.init would wait 30 s)
    with pytest.raises(UserError, match=f"^no Ray cluster answers at {client} "):
        probe(client, timeout_s=5)
    with pytest.raises(UserError, match="^bad Ray address"):
        probe("127.0.0.1")


# ------------------------------------------------------------------------------------- autoscaling


class LocalAutoscalingCluster:
    """cluster/local-fake.yaml brought up by `ray start --head --block` in a process group of its own,
    with a private RAY_TMPDIR, 127.0.0.1 addresses and token authentication (a token file of its own)."""

    def __init__(self, root: Path):
        self.root, self.port = root, _free_port()
        self.token = root / "auth_token"
        self.token.write_text(os.urandom(16).hex())
        config = yaml.safe_load((CLUSTER / "local-fake.yaml").read_text())
        config["provider"]["gcs_address"] = f"127.0.0.1:{self.port}"
        self.config = root / "cluster.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen | None = None

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
        env.update(
            RAY_TMPDIR=str(self.root / "ray"),
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # 127.0.0.1 nodes
            RAY_AUTH_TOKEN_PATH=str(self.token),
        )
        env.update(extra)
        return env

    def client_env(self, **extra: str) -> dict[str, str]:
        """A driver's environment: RAY_ADDRESS for `--address auto`, token mode and the token file."""
        return self.env(**{"RAY_ADDRESS": f"127.0.0.1:{self.port}", "RAY_AUTH_MODE": "token", **extra})

    def __enter__(self) -> LocalAutoscalingCluster:
        env = self.env(
            RAY_AUTH_MODE="token",
            RAY_FAKE_CLUSTER="1",
            RAY_enable_autoscaler_v2="1",
            RAY_CLOUD_INSTANCE_ID=FAKE_HEAD_ID,
            RAY_OVERRIDE_NODE_ID_FOR_TESTING=FAKE_HEAD_ID,
            AUTOSCALER_UPDATE_INTERVAL_S="1",
        )
        ray_cli = Path(sys.executable).parent / "ray"
        cmd = [
            str(ray_cli),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={self.port}",
            "--num-cpus=0",
            "--include-dashboard=false",
            f"--autoscaling-config={self.config}",
            "--disable-usage-stats",
        ]
        self.log = open(self.root / "head.log", "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 90
        while self.raylets() < 1 or not _answers(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                pytest.fail(f"the head did not start: {(self.root / 'head.log').read_text()[-3000:]}")
            time.sleep(0.5)
        return self

    def monitor_log(self, chars: int = 4000) -> str:
        """The tail of the autoscaler's log (its monitor process), to say why a test waited on it."""
        logs = sorted(self.root.glob("ray/**/session_*/logs/monitor.log"), key=lambda p: p.stat().st_mtime)
        return f"monitor.log: ...{logs[-1].read_text()[-chars:]}" if logs else "no monitor.log"

    def raylets(self) -> int:
        """Live Ray nodes of this cluster: its raylet processes."""
        import psutil

        count = 0
        for p in psutil.process_iter(["name"]):
            try:
                if p.info["name"] == "raylet" and os.getpgid(p.pid) == self.proc.pid:
                    count += 1
            except (psutil.Error, ProcessLookupError):
                pass
        return count

    def __exit__(self, *exc) -> None:
        """SIGTERM to the group (the head shuts its processes down), then SIGKILL to what is left."""
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _group_alive(self.proc.pid):
                self.proc.poll()
                time.sleep(0.2)
        self.proc.wait(timeout=10)
        self.log.close()


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.mark.slow
@pytest.mark.cluster
def test_autoscaler_adds_nodes_for_a_job_and_removes_them_after(tiny_data, tmp_path, short_tmp):
    import threading

    with LocalAutoscalingCluster(short_tmp) as cluster:
        assert cluster.raylets() == 1  # the head only, and it offers no CPUs
        peak, done = [1], threading.Event()

        def watch() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], cluster.raylets())
                time.sleep(0.5)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        run = tmp_path / "run"
        common = ("--config", str(TINY), "--address", "auto")
        proc = _cli(
            "pretrain",
            "--data",
            tiny_data,
            "--run",
            str(run),
            *common,
            "--set",
            "train.steps=4",
            "train.checkpoint_every=4",
            "train.eval_every=4",
            "train.log_every=2",
            "scaling.num_workers=2",
            env=cluster.client_env(GENPT_RESOURCES_TIMEOUT_S="240"),
            timeout=600,
        )
        done.set()
        watcher.join()
        assert proc.returncode == 0, proc.stderr[-4000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out["step"] == 4 and out["checkpoint"]
        assert "waiting for the autoscaler (v2) to add nodes for 2 workers x 1 CPUs" in proc.stderr
        assert "the cluster has room for 2 workers x 1 CPUs" in proc.stderr
        assert peak[0] >= 3  # the head and two 1-CPU nodes, one per worker

        # Meanwhile a client without the cluster's token is refused, in one line (after Ray's ~20 s of retries).
        (short_tmp / "other-token").write_text("not-the-token")
        no_token = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "launch.py"),
                "pretrain",
                "--data",
                tiny_data,
                "--run",
                str(tmp_path / "bad"),
                *common,
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cluster.client_env(RAY_AUTH_TOKEN_PATH=str(short_tmp / "other-token")),
        )
        deadline = time.monotonic() + 90  # idle nodes go after 6 s (idle_timeout_minutes: 0.1)
        while cluster.raylets() > 1 and time.monotonic() < deadline:
            time.sleep(1)
        assert cluster.raylets() == 1
        out, err = no_token.communicate(timeout=300)
        _one_line_error(
            subprocess.CompletedProcess(no_token.args, no_token.returncode, out, err), "refused this client's token"
        )

        # What no node type can ever provide is refused at once, not waited for.
        t0 = time.monotonic()
        proc = _cli(
            "pretrain",
            "--data",
            tiny_data,
            "--run",
            str(tmp_path / "bad"),
            *common,
            "--set",
            "scaling.use_gpu=true",
            env=cluster.client_env(GENPT_RESOURCES_TIMEOUT_S="100"),  # the refusal comes in seconds
            timeout=300,
        )
        _one_line_error(proc, "can never provide 2 x {CPU: 1, GPU: 1}", cluster.monitor_log())
        assert time.monotonic() - t0 < 120


# --------------------------------------------------------------------------------------- multi-node


@pytest.mark.slow
@pytest.mark.cluster
def test_multinode_spread_node_loss_and_rollout_rescheduling(tiny_data, tmp_path, short_tmp):
    from genpt_dist.data.loader import ShardLoader, pieces_for_span, shard_order
    from genpt_dist.data.manifest import load_manifest

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update(
        RAY_TMPDIR=str(short_tmp / "ray"),
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        # Right after a node dies Ray Train may still count it and try the old size first; this
        # bounds that try (60 s by default) before it restarts with the workers that fit.
        RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="10",
    )
    script = subprocess.Popen(
        [sys.executable, __file__, "multinode", str(tmp_path), tiny_data],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = script.communicate(timeout=600)
    finally:  # whatever the script left running (it shuts its cluster down itself when it can)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if _group_alive(script.pid):
                os.killpg(script.pid, sig)
                time.sleep(3)
    assert script.returncode == 0, stderr[-5000:]
    report = json.loads((tmp_path / "report.json").read_text())

    # The package reached every node through the runtime env (py_modules). (Here the checkout is also on
    # the workers' path, the driver's cwd, which Ray puts first; on a real cluster it is not there.)
    assert len(report["code"]) == 2 and all(report["code"].values()), report["code"]

    # prepare --address: the tokenising tasks spread over both CPU nodes (SPREAD), none on the head.
    assert report["prepare"]["nodes"] == 2 and report["prepare"]["documents"] == 12, report["prepare"]

    # Two workers on two different nodes (not the head); each reads its own slice of the epoch's shards.
    training = report["training"]
    assert len(training["worker_nodes"]) == 2 and report["head"] not in training["worker_nodes"]
    manifest = load_manifest(tiny_data)
    slices = []
    for rank in (0, 1):
        loader = ShardLoader(manifest, "train", batch_size=8, rank=rank, world_size=2)
        order = shard_order(len(loader.shards), loader.seed, 0, True)
        span = pieces_for_span(loader.counts, order, rank * loader.per_rank, (rank + 1) * loader.per_rank)
        slices.append({(p.shard, i) for p in span for i in range(p.lo, p.hi)})
    assert slices[0] and slices[1] and not slices[0] & slices[1]

    # A node removed mid-run: Ray Train restarted the group with the one worker left, from the last
    # 2-worker checkpoint, re-partitioned; the run reached its last step and the loss went on falling.
    said = f"{training}\n{stderr[-3000:]}"
    assert 6 <= training["removed_after_step"] < 24 and training["result"]["step"] == 24, said
    worlds = dict(training["checkpoints"])
    assert worlds[24] == 1 and any(w == 2 and s <= training["removed_after_step"] for s, w in worlds.items()), said
    losses = training["losses"]
    assert losses[-1] < losses[0] - 0.5, losses
    assert "re-partitioning the optimizer state" in stderr

    # Rollout actors: the one whose node went was restarted on another node; no row was lost.
    rollout = report["rollout"]
    assert rollout["rows"] == rollout["asked"] and rollout["alive"] == 2
    assert rollout["moved_to"] not in (None, rollout["removed_node"], report["head"])


def _wait_until_gone(pid: int, timeout_s: float) -> None:
    """Until process `pid` has exited (no longer in /proc, or a zombie)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.1)
    raise AssertionError(f"process {pid} still runs {timeout_s:.0f} s after its node was removed")


def _actor_nodes(class_name: str) -> dict[str, str]:
    """Alive actors of a class -> the node each runs on (from GCS's actor table)."""
    return {aid: node for aid, (node, _) in _actors(class_name).items()}


def _actors(class_name: str) -> dict[str, tuple[str, int]]:
    """Alive actors of a class -> (the node each runs on, its process id), from GCS's actor table."""
    from ray._private.state import actors

    return {
        aid: (a["Address"]["NodeID"], a["Pid"])
        for aid, a in actors().items()
        if a["ActorClassName"].endswith(class_name) and a["State"] == "ALIVE"
    }


def _multinode_script(root: str, data: str) -> None:
    """A head without CPUs and 1-CPU nodes a, b (c, d later), each with a custom resource naming it."""
    import threading

    import ray
    from ray.cluster_utils import Cluster

    from genpt_dist.checkpoint import list_checkpoints
    from genpt_dist.config import load_config
    from genpt_dist.raycluster import init_ray
    from genpt_dist.train.pretrain import pretrain

    report: dict = {}
    local = {"node_ip_address": "127.0.0.1"}
    fast_failure_detection = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False, "_system_config": fast_failure_detection, **local},
    )
    nodes = {name: cluster.add_node(num_cpus=1, resources={f"node_{name}": 1}, **local) for name in "ab"}
    try:
        init_ray(cluster.address)  # the joining path: probe, runtime env, worker output
        report["head"] = cluster.head_node.node_id

        @ray.remote(num_cpus=0)
        def shipped() -> list[str]:
            """Entries of this worker's sys.path that hold the package as the runtime env shipped it."""
            return [p for p in sys.path if "runtime_resources" in p and Path(p, "genpt_dist", "__init__.py").is_file()]

        report["code"] = {n: ray.get(shipped.options(resources={f"node_{n}": 0.01}).remote()) for n in "ab"}
        report["prepare"] = _prepare_phase(root, cluster.address)

        # Elastic pretraining on a and b; node b goes once a checkpoint exists, the worker on a held
        # (SIGSTOP) meanwhile: the run is a few seconds of steps, which outran a node removal before.
        run = f"{root}/run"
        cfg = load_config(
            TINY,
            [
                "scaling.num_workers=[1, 2]",
                "scaling.max_failures=3",
                "train.steps=24",
                "train.checkpoint_every=6",
                "train.keep_checkpoints=8",
                "train.log_every=6",
                "train.eval_every=12",
            ],
        )
        result: dict = {}
        trainer = threading.Thread(target=lambda: result.update(pretrain(data, run, cfg)), daemon=True)
        trainer.start()
        training: dict = {"worker_nodes": []}
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and trainer.is_alive():
            if list_checkpoints(run):  # the first 2-worker checkpoint: node b goes mid-run, whatever the speed
                workers = _actors("RayTrainWorker")
                on_b = nodes["b"].node_id
                survivor = next(pid for node, pid in workers.values() if node != on_b)
                os.kill(survivor, signal.SIGSTOP)  # holds the run (b waits on it in the next collective)
                try:
                    training["worker_nodes"] = sorted({node for node, _ in workers.values()})
                    training["removed_after_step"] = max(r.step for r in list_checkpoints(run))
                    cluster.remove_node(nodes.pop("b"), allow_graceful=False)
                    # b's worker outlives its raylet for a moment: gone only once the process is
                    for pid in [pid for node, pid in workers.values() if node == on_b]:
                        _wait_until_gone(pid, timeout_s=60)
                finally:
                    os.kill(survivor, signal.SIGCONT)
                break
            time.sleep(0.2)
        trainer.join(timeout=400)
        assert not trainer.is_alive(), "the training run did not end"
        training["result"] = result
        training["checkpoints"] = [(r.step, r.meta.world_size) for r in list_checkpoints(run)]
        rows = [json.loads(line) for line in Path(run, "metrics.jsonl").read_text().splitlines()]
        training["losses"] = [m["train_loss"] for m in rows if "train_loss" in m]
        report["training"] = training

        # Rollout actors spread over a, c and d; the node of one goes while it samples.
        report["rollout"] = _rollout_phase(cluster, nodes, local)
    finally:
        Path(root, "report.json").write_text(json.dumps(report, indent=1))
        ray.shutdown()
        cluster.shutdown()


def _prepare_phase(root: str, address: str) -> dict:
    """`prepare --address` of a corpus of many small work units: its tokenising tasks on both nodes."""
    from genpt_dist.config import load_config
    from genpt_dist.data.prepare import prepare

    corpus = Path(root, "corpus")
    corpus.mkdir()
    text = SHAKESPEARE.read_text()[:240_000]
    for i in range(12):
        (corpus / f"part-{i:02d}.txt").write_text(text[i * 20_000 : (i + 1) * 20_000])
    overrides = ["data.tokenizer=byte", "data.parallel_min_bytes=0", "data.unit_bytes=20000", "data.seq_len=64"]
    cfg = load_config(None, overrides).data  # one task per file
    return prepare([str(corpus)], f"{root}/prepared", cfg, address=address)


def _rollout_phase(cluster, nodes: dict, local: dict) -> dict:
    import dataclasses

    from genpt_dist.model.discriminator import DiscriminatorConfig
    from genpt_dist.model.gpt import GPT, GPTConfig
    from genpt_dist.rl.rollout import RolloutGroup, RolloutRequest

    for name in "cd":
        nodes[name] = cluster.add_node(num_cpus=1, resources={f"node_{name}": 1}, **local)
    cluster.wait_for_nodes()
    policy = GPTConfig(vocab_size=259, block_size=64, n_layer=1, n_head=2, d_model=32)
    disc = DiscriminatorConfig(vocab_size=259, block_size=64, n_layer=1, n_head=2, d_model=32)
    group = RolloutGroup(
        2,
        cpus_per_actor=1,
        gpus_per_actor=0,
        max_restarts=3,
        model_config=dataclasses.asdict(policy),
        disc_config=dataclasses.asdict(disc),
        reference_state=GPT(policy).state_dict(),
        pad_id=0,
        eos_id=2,
    )
    try:
        by_id = {n.node_id: name for name, n in nodes.items()}
        victim_actor, victim_node = sorted(_actor_nodes("RolloutActor").items())[0]
        request = RolloutRequest(prompts=[[1]] * 16, seeds=list(range(16)), max_new_tokens=16)
        refs = group.generate_refs(request)
        cluster.remove_node(nodes.pop(by_id[victim_node]), allow_graceful=False)
        rows = group.collect(refs).batch_size  # while the actor is gone: its rows re-issued to the other
        deadline, moved_to = time.monotonic() + 120, None
        while time.monotonic() < deadline and moved_to in (None, victim_node):
            time.sleep(0.5)
            moved_to = _actor_nodes("RolloutActor").get(victim_actor)
        alive = group.actors_alive(timeout_s=60)
        rows += group.generate(request).batch_size  # and with both actors back
        return {
            "asked": 2 * len(request),
            "rows": rows,
            "alive": alive,
            "removed_node": victim_node,
            "moved_to": moved_to,
            "reissued": group.reissued,
        }
    finally:
        group.shutdown()


if __name__ == "__main__":
    if sys.argv[1:2] == ["multinode"]:
        import logging

        logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        _multinode_script(sys.argv[2], sys.argv[3])
    else:
        sys.exit(f"usage: {sys.argv[0]} multinode ROOT DATA")
