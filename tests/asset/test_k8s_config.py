"""The documented production configs in deploy/ are valid, without a cluster or a database:

- each dagster.yaml against Dagster's instance schema, then every class it names against that class's own config
  schema, the way DagsterInstance loads them (``ConfigurableClassData.rehydrate``), with env vars resolved;
- the effective instance settings (run queue limits, gpu pool) of deploy/k8s/dagster.yaml on a real
  ``DagsterInstance`` (storage swapped for SQLite);
- the run pod's Kubernetes Job, built by a real ``K8sRunLauncher.launch_run`` against a fake Kubernetes API, and
  every step pod's Job as the ``k8s_job_executor`` would build it from deploy/k8s/run_config.yaml — which checks
  the raw Kubernetes blocks (Permissive in Dagster's schema) against the Kubernetes API models;
- deploy/k8s/definitions.py loads and gives every job the configured executor;
- a typo anywhere in these files fails with an error naming it.
"""

import importlib
import importlib.util
import json
import re
import tempfile
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pytest
import yaml

pytest.importorskip("dagster_k8s")
pytest.importorskip("dagster_postgres")

from dagster._config import process_config, resolve_to_config_type  # noqa: E402
from dagster._core.errors import DagsterInvalidConfigError  # noqa: E402
from dagster._core.instance.ref import InstanceRef  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S_YAML = DEPLOY / "k8s" / "dagster.yaml"
PG_YAML = DEPLOY / "postgres" / "dagster.yaml"
RUN_CONFIG = DEPLOY / "k8s" / "run_config.yaml"
K8S_DEFINITIONS = DEPLOY / "k8s" / "definitions.py"
DOCS = REPO / "docs" / "production.md"
IMAGE = "registry.example.com/prefmill:1.0"
PG_ENV = {"DAGSTER_PG_HOST": "db.internal", "DAGSTER_PG_PORT": "5433", "DAGSTER_PG_USERNAME": "dagster",
          "DAGSTER_PG_DB": "dagster", "DAGSTER_PG_PASSWORD": "not-a-real-password"}
FAKE_KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: test, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: test, user: {token: not-a-token}}]
contexts: [{name: test, context: {cluster: test, user: test, namespace: prefmill}}]
current-context: test
"""


@pytest.fixture
def pg_env(monkeypatch):
    for name, value in PG_ENV.items():
        monkeypatch.setenv(name, value)


def _copy(tmp_path: Path, source: Path, typo: tuple[str, str] | None = None) -> Path:
    """``source`` copied to ``<tmp>/<parent name>/<name>``, with one text replacement when ``typo`` is given."""
    folder = tmp_path / source.parent.name
    folder.mkdir(parents=True, exist_ok=True)
    text = source.read_text()
    if typo:
        assert text.count(typo[0]) >= 1, f"{typo[0]!r} not in {source}"
        text = text.replace(typo[0], typo[1], 1)
    target = folder / source.name
    target.write_text(text)
    return target


def _klass(data):
    return getattr(importlib.import_module(data.module_name), data.class_name)


def validate_instance_yaml(path: Path) -> tuple[InstanceRef, dict]:
    """Everything DagsterInstance checks before it connects to anything: the instance schema (and the concurrency
    rules) in ``InstanceRef.from_dir``, then each configurable class's schema, env vars resolved. Returns the ref
    and the processed config of every class by slot."""
    ref = InstanceRef.from_dir(str(path.parent), config_filename=path.name)
    processed = {}
    for slot in ("storage_data", "run_launcher_data", "run_coordinator_data", "scheduler_data",
                 "compute_logs_data", "local_artifact_storage_data", "secrets_loader_data"):
        data = getattr(ref, slot)
        if data is None:
            continue
        result = process_config(resolve_to_config_type(_klass(data).config_type()), data.config_dict)
        if not result.success:
            raise DagsterInvalidConfigError(f"{path}: errors in the config of {data.class_name}", result.errors,
                                            data.config_dict)
        processed[slot] = result.value
    return ref, processed


class _FakeBatchApi:
    """Stands in for kubernetes.client.BatchV1Api: records the Jobs it is asked to create."""

    def __init__(self):
        self.created = []

    def create_namespaced_job(self, body, namespace, **_):
        self.created.append((namespace, body))
        return body


def _launcher(ref, processed, tmp_path: Path, batch_api=None):
    """The instance's K8sRunLauncher from its processed config, pointed at a kubeconfig for a cluster that does not
    exist (loading in-cluster config outside a cluster fails; nothing here talks to the API)."""
    from dagster_k8s import K8sRunLauncher

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(FAKE_KUBECONFIG)
    config = {**processed["run_launcher_data"], "load_incluster_config": False, "kubeconfig_file": str(kubeconfig)}
    return K8sRunLauncher(inst_data=ref.run_launcher_data, k8s_client_batch_api=batch_api, **config)


def _run(job_name: str, tags: dict | None = None):
    from dagster._core.code_pointer import ModuleCodePointer
    from dagster._core.origin import JobPythonOrigin, RepositoryPythonOrigin
    from dagster._core.storage.dagster_run import DagsterRun

    origin = JobPythonOrigin(job_name, RepositoryPythonOrigin(
        "/usr/local/bin/python", ModuleCodePointer("pipelines.definitions", "defs", "/app"), container_image=IMAGE))
    return DagsterRun(job_name=job_name, run_id="5eed5eed-0000-4000-8000-000000000001", job_code_origin=origin,
                      tags=tags or {})


def launch_run_pod(path: Path, tmp_path: Path, tags: dict | None = None) -> tuple[str, dict]:
    """The run pod's Job that K8sRunLauncher.launch_run submits for a label_batch_job run: (namespace, manifest)."""
    import kubernetes
    from dagster._core.launcher import LaunchRunContext

    ref, processed = validate_instance_yaml(path)
    home = Path(tempfile.mkdtemp(prefix="sqlite_home", dir=tmp_path))
    # A real instance for the launcher to report to; only the storage differs from the file under test.
    instance = dg.DagsterInstance.from_ref(InstanceRef.from_dir(
        str(home), config_dir=str(path.parent), config_filename=path.name,
        overrides={"storage": {"sqlite": {"base_dir": str(home)}}}))
    api = _FakeBatchApi()
    launcher = _launcher(ref, processed, tmp_path, batch_api=api)
    launcher.register_instance(instance)
    run = _run("label_batch_job", tags)
    instance.add_run(run)
    launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=None))
    assert len(api.created) == 1
    namespace, job = api.created[0]
    return namespace, kubernetes.client.ApiClient().sanitize_for_serialization(job)


def executor_config(path: Path) -> dict:
    """deploy/k8s/run_config.yaml's executor config, processed against k8s_job_executor's schema."""
    from dagster_k8s import k8s_job_executor

    raw = yaml.safe_load(path.read_text())
    assert set(raw) == {"execution"} and set(raw["execution"]) == {"config"}, "run config holds only the executor"
    result = process_config(k8s_job_executor.config_schema.config_type, raw["execution"]["config"])
    if not result.success:
        raise DagsterInvalidConfigError(f"{path}: errors in the k8s_job_executor config", result.errors, raw)
    return result.value


def step_pod_jobs(run_config_path: Path, instance_path: Path, tmp_path: Path) -> dict[str, dict]:
    """Per asset, the step pod's Job manifest the k8s_job_executor builds: the executor made by k8s_job_executor's
    own factory from the processed config, merged with the run launcher's settings by its step handler."""
    import kubernetes
    from dagster_k8s import k8s_job_executor
    from dagster_k8s.job import construct_dagster_k8s_job

    from pipelines.definitions import ALL_ASSETS

    ref, processed = validate_instance_yaml(instance_path)
    launcher = _launcher(ref, processed, tmp_path)
    config = {**executor_config(run_config_path), "load_incluster_config": False,
              "kubeconfig_file": str(tmp_path / "kubeconfig")}
    executor = k8s_job_executor.executor_creation_fn(
        SimpleNamespace(instance=SimpleNamespace(run_launcher=launcher), executor_config=config))
    handler = executor._step_handler  # noqa: SLF001 - the K8sStepHandler that launches step pods
    run = _run("label_batch_job")
    jobs = {}
    for asset in ALL_ASSETS:
        step = asset.op.name
        context = SimpleNamespace(
            dagster_run=run, instance=SimpleNamespace(run_launcher=launcher), step_tags={step: {}},
            execute_step_args=SimpleNamespace(step_keys_to_execute=[step]),
            get_step_context=lambda key: SimpleNamespace(step=SimpleNamespace(op_name=key)))
        container_context = handler._get_container_context(context)  # noqa: SLF001
        job = construct_dagster_k8s_job(
            job_config=container_context.get_k8s_job_config(IMAGE, launcher), args=["dagster", "api", "execute_step"],
            job_name=f"dagster-step-{step.replace('_', '-')}", component="step_worker",
            user_defined_k8s_config=container_context.run_k8s_config)
        jobs[step] = kubernetes.client.ApiClient().sanitize_for_serialization(job)
    return jobs


def _gpu_assets() -> set[str]:
    from pipelines.definitions import ALL_ASSETS

    return {a.op.name for a in ALL_ASSETS if a.op.pool == "gpu"}


def _docs_run_tags() -> list[dict]:
    """The ```json blocks of docs/production.md that are `dagster-k8s/config` values."""
    blocks = re.findall(r"```json\n(.*?)```", DOCS.read_text(), flags=re.S)
    tags = [json.loads(b) for b in blocks]
    assert tags, "docs/production.md shows the dagster-k8s/config run tag"
    return tags


# --- the instance files ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [K8S_YAML, PG_YAML], ids=["k8s", "postgres"])
def test_instance_yaml_validates_against_dagster_and_its_classes(path, pg_env):
    from dagster_postgres.utils import pg_url_from_config

    ref, processed = validate_instance_yaml(path)
    assert (ref.storage_data.module_name, ref.storage_data.class_name) == ("dagster_postgres", "DagsterPostgresStorage")
    # Run, event-log and schedule storage all come from that one Postgres block.
    assert {ref.run_storage_data.class_name, ref.event_storage_data.class_name, ref.schedule_storage_data.class_name} \
        == {"PostgresRunStorage", "PostgresEventLogStorage", "PostgresScheduleStorage"}
    url = pg_url_from_config(processed["storage_data"])
    assert url.startswith("postgresql+psycopg2://dagster:not-a-real-password@")  # the driver dagster-postgres ships
    if path == K8S_YAML:
        assert _klass(ref.run_launcher_data).__name__ == "K8sRunLauncher"
        assert _klass(ref.run_coordinator_data).__name__ == "QueuedRunCoordinator"
        launcher = processed["run_launcher_data"]
        assert launcher["postgres_password_secret"] and launcher["instance_config_map"]
        assert {"prefmill-judge", "prefmill-aws"} <= set(launcher["env_secrets"])
    else:
        assert url == "postgresql+psycopg2://dagster:not-a-real-password@db.internal:5433/dagster"


@pytest.mark.parametrize("path", [K8S_YAML, PG_YAML], ids=["k8s", "postgres"])
def test_the_database_password_only_comes_from_the_environment(path, pg_env, monkeypatch):
    raw = yaml.safe_load(path.read_text())
    assert raw["storage"]["postgres"]["postgres_db"]["password"] == {"env": "DAGSTER_PG_PASSWORD"}
    monkeypatch.delenv("DAGSTER_PG_PASSWORD")
    with pytest.raises(DagsterInvalidConfigError, match="DAGSTER_PG_PASSWORD"):
        validate_instance_yaml(path)


@pytest.mark.parametrize("path", [K8S_YAML, PG_YAML], ids=["k8s", "postgres"])
def test_concurrency_keeps_the_repository_gpu_pool(path):
    repo = yaml.safe_load((REPO / "dagster.yaml").read_text())["concurrency"]
    ours = yaml.safe_load(path.read_text())["concurrency"]
    assert ours["pools"]["default_limit"] == repo["pools"]["default_limit"]
    if path == PG_YAML:
        assert ours == repo  # the local Postgres setup changes storage only


def test_k8s_instance_queues_runs_with_tag_limits_and_op_granular_pools(tmp_path, pg_env):
    """The settings a real DagsterInstance derives from deploy/k8s/dagster.yaml (storage swapped for SQLite, the
    one thing that would need a server)."""
    from dagster._core.instance.config import PoolGranularity
    from dagster._core.run_coordinator import QueuedRunCoordinator

    ref = InstanceRef.from_dir(str(tmp_path), config_dir=str(K8S_YAML.parent),
                               overrides={"storage": {"sqlite": {"base_dir": str(tmp_path)}}})
    with dg.DagsterInstance.from_ref(ref) as instance:
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        config = instance.get_concurrency_config()
        assert config.pool_config.default_pool_limit == 1
        assert config.pool_config.pool_granularity == PoolGranularity.OP
        queue = config.run_queue_config
        assert queue.max_concurrent_runs == 8
        limits = {limit["key"]: limit for limit in queue.tag_concurrency_limits}
        assert limits["dagster/partition"] == {"key": "dagster/partition", "limit": 1,
                                               "value": {"applyLimitPerUniqueValue": True}}
        assert limits["dagster/backfill"]["limit"] == 4
        assert instance.run_monitoring_enabled and instance.run_retries_enabled


# --- the run pod -------------------------------------------------------------------------------------------------

def test_the_run_launcher_builds_the_documented_run_pod(tmp_path, pg_env):
    namespace, job = launch_run_pod(K8S_YAML, tmp_path)
    assert namespace == "prefmill"
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == IMAGE and container["imagePullPolicy"] == "IfNotPresent"
    assert pod["serviceAccountName"] == "prefmill-runs"
    assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
    env_from = container["envFrom"]
    assert {"configMapRef": {"name": "prefmill-env"}} in env_from
    # the judge endpoint's key and the AWS credentials arrive from Secrets, never as literal values
    assert {"secretRef": {"name": "prefmill-judge"}} in env_from and {"secretRef": {"name": "prefmill-aws"}} in env_from
    env = {e["name"]: e for e in container["env"]}
    assert env["DAGSTER_PG_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "prefmill-postgresql",
                                                                       "key": "postgresql-password"}
    assert env["DAGSTER_HOME"]["value"] == "/opt/dagster/dagster_home"
    assert not any("PASSWORD" in e["name"] and "value" in e or "API_KEY" in e["name"] for e in container["env"])
    assert container["volumeMounts"] == [{"name": "prefmill-data", "mountPath": "/data"}]
    assert pod["volumes"] == [{"name": "prefmill-data", "persistentVolumeClaim": {"claimName": "prefmill-data"}}]
    assert container["resources"] == {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}}
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["ttlSecondsAfterFinished"] == 86400
    assert job["spec"]["template"]["metadata"]["annotations"]["cluster-autoscaler.kubernetes.io/safe-to-evict"] \
        == "false"


def test_the_documented_gpu_run_tag_gives_the_run_pod_a_gpu(tmp_path, pg_env):
    for tag in _docs_run_tags():
        _, job = launch_run_pod(K8S_YAML, tmp_path, tags={"dagster-k8s/config": json.dumps(tag)})
        pod = job["spec"]["template"]["spec"]
        resources = pod["containers"][0]["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == "1" and resources["requests"]["nvidia.com/gpu"] == "1"
        assert resources["requests"]["cpu"] == "1"  # merged onto the launcher's resources, not replacing them
        assert pod["nodeSelector"] == {"prefmill.io/node-kind": "gpu"}
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"


# --- the executors -----------------------------------------------------------------------------------------------

def test_the_documented_multiprocess_run_config_is_valid():
    """docs/production.md's forkserver run config, against the default executor of pipelines.definitions."""
    from pipelines.definitions import defs

    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), flags=re.S)]
    run_configs = [b for b in blocks if isinstance(b, dict) and set(b) == {"execution"}]
    assert run_configs, "docs/production.md shows the multiprocess run config"
    job = defs.resolve_job_def("label_batch_job")
    for run_config in run_configs:
        resolved = dg.validate_run_config(job, run_config)["execution"][job.executor_def.name]
        start = resolved["multiprocess"]["start_method"]["forkserver"]
        for module in start["preload_modules"]:
            assert importlib.util.find_spec(module) is not None, module



def test_run_config_is_valid_for_the_k8s_job_executor():
    """As run config of a code location using the plain k8s_job_executor (`dagster job launch -c ...`)."""
    from dagster_k8s import k8s_job_executor

    from pipelines.automation import label_batch_job
    from pipelines.definitions import ALL_ASSETS
    from pipelines.resources import default_resources

    config = executor_config(RUN_CONFIG)
    assert config["max_concurrent"] == 4
    # exactly the assets that declare pool="gpu" get a GPU per step; the test fails when one joins or leaves
    assert set(config["per_step_k8s_config"]) == _gpu_assets()
    run_config = yaml.safe_load(RUN_CONFIG.read_text())
    defs = dg.Definitions(assets=ALL_ASSETS, jobs=[label_batch_job], resources=default_resources(),
                          executor=k8s_job_executor)
    for job_name in ("label_batch_job", "__ASSET_JOB"):
        job = defs.resolve_job_def(job_name)
        assert job.executor_def is k8s_job_executor
        resolved = dg.validate_run_config(job, run_config)["execution"][k8s_job_executor.name]
        assert resolved["max_concurrent"] == 4 and set(resolved["per_step_k8s_config"]) == _gpu_assets()


def test_the_k8s_code_location_applies_the_executor_to_every_job():
    """deploy/k8s/definitions.py: every job of pipelines.definitions, with run_config.yaml's executor settings
    resolved for a run that brings no run config (as sensor and schedule runs do)."""
    import runpy

    from pipelines.definitions import defs as local_defs

    namespace = runpy.run_path(str(K8S_DEFINITIONS), run_name="prefmill_k8s_definitions")
    defs, executor = namespace["defs"], namespace["prefmill_k8s_executor"]
    names = {job.name for job in local_defs.resolve_all_job_defs()}
    assert {"label_batch_job", "corpus_and_training_job", "__ASSET_JOB"} <= names
    assert names == {job.name for job in defs.resolve_all_job_defs()}
    assert {s.name for s in local_defs.sensors} == {s.name for s in defs.sensors}
    for name in names:
        job = defs.resolve_job_def(name)
        assert job.executor_def is executor, name
        resolved = dg.validate_run_config(job, {})["execution"][executor.name]
        assert resolved == executor_config(RUN_CONFIG) | {"enable_owner_references": False}, name


def test_step_pods_get_gpus_only_for_the_gpu_pool(tmp_path, pg_env):
    jobs = step_pod_jobs(RUN_CONFIG, K8S_YAML, tmp_path)
    gpu = _gpu_assets()
    assert gpu >= {"candidate_images", "reward_labels"} and set(jobs) > gpu
    for step, job in jobs.items():
        pod = job["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        # every step pod inherits the launcher's image, account, env sources, secrets and the data volume
        assert container["image"] == IMAGE and pod["serviceAccountName"] == "prefmill-runs"
        assert {"secretRef": {"name": "prefmill-judge"}} in container["envFrom"]
        assert container["volumeMounts"] == [{"name": "prefmill-data", "mountPath": "/data"}]
        limits = container["resources"].get("limits", {})
        if step in gpu:
            assert limits["nvidia.com/gpu"] == "1", step
            assert pod["nodeSelector"] == {"prefmill.io/node-kind": "gpu"}, step
            assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        else:
            assert "nvidia.com/gpu" not in limits and "nvidia.com/gpu" not in container["resources"]["requests"]
            assert pod["nodeSelector"] == {"prefmill.io/node-kind": "cpu"} and not pod.get("tolerations")
            assert container["resources"]["requests"] == {"cpu": "2", "memory": "4Gi"}


# --- typos fail --------------------------------------------------------------------------------------------------

TYPOS = [
    # (file, text, replacement, what the error must name, what catches it)
    (K8S_YAML, "service_account_name:", "service_acount_name:", "service_acount_name", "K8sRunLauncher's schema"),
    (K8S_YAML, "max_concurrent_runs:", "max_concurent_runs:", "max_concurent_runs", "the instance schema"),
    (K8S_YAML, "db_name:", "dbname:", "dbname", "the Postgres storage schema"),
    (K8S_YAML, "dequeue_use_threads:", "dequeue_use_thread:", "dequeue_use_thread", "QueuedRunCoordinator's schema"),
    (K8S_YAML, "class: K8sRunLauncher", "class: K8sRunLaunchr", "K8sRunLaunchr", "the class lookup"),
    (K8S_YAML, "persistent_volume_claim:", "persistent_volume_clam:", "persistent_volume_clam", "the V1Volume model"),
    (K8S_YAML, "termination_grace_period_seconds:", "termination_grace_period_second:",
     "termination_grace_period_second", "the V1PodSpec model"),
    (PG_YAML, "hostname:", "host:", "host", "the Postgres storage schema"),
    (PG_YAML, "default_limit:", "default_limt:", "default_limt", "the instance schema"),
    (RUN_CONFIG, "max_concurrent:", "max_concurent:", "max_concurent", "k8s_job_executor's schema"),
    (RUN_CONFIG, "per_step_k8s_config:", "per_step_k8s_conf:", "per_step_k8s_conf", "k8s_job_executor's schema"),
    (RUN_CONFIG, "tolerations:", "toleration:", "toleration", "the V1PodSpec model"),
    (RUN_CONFIG, "node_selector:", "nodeselector:", "nodeselector", "the V1PodSpec model"),
]


@pytest.mark.parametrize("source,text,typo,named,caught_by", TYPOS,
                         ids=[f"{p.parent.name}/{p.name}:{t.rstrip(':')}" for p, _, t, _, _ in TYPOS])
def test_a_typo_fails_validation(source, text, typo, named, caught_by, tmp_path, pg_env):
    """The checks that pass on the real files, run on a copy with one key misspelt."""
    broken = _copy(tmp_path, source, (text, typo))
    if source == RUN_CONFIG:
        def check():
            return step_pod_jobs(broken, K8S_YAML, tmp_path)
    elif source == K8S_YAML:
        def check():
            return launch_run_pod(broken, tmp_path)
    else:
        def check():
            return validate_instance_yaml(broken)
    with pytest.raises(Exception) as error:  # noqa: PT011 - Dagster config, Kubernetes model and lookup errors
        check()
    assert re.search(rf"\b{re.escape(named)}\b", str(error.value)), \
        f"{caught_by} should name {named!r}: {error.value}"
