"""The prefmill code location for Kubernetes with the step-per-pod executor.

Everything of ``pipelines.definitions`` (assets, jobs, sensors, schedules, resources), with
``dagster_k8s.k8s_job_executor`` configured from ``deploy/k8s/run_config.yaml`` as the executor of every job, so
runs from sensors and schedules get the per-step pod settings (GPUs for the gpu pool) without run config.

Serve it from the image (Helm ``dagster-user-deployments``)::

    dagster api grpc --python-file deploy/k8s/definitions.py --working-directory /app -h 0.0.0.0 -p 3030

Keep ``-m pipelines.definitions`` instead to run each run's steps in its run pod (multiprocess executor).
"""

from pathlib import Path

import yaml
from dagster_k8s import k8s_job_executor

from pipelines.definitions import build_definitions

RUN_CONFIG = Path(__file__).resolve().with_name("run_config.yaml")


def executor_config(path: Path = RUN_CONFIG) -> dict:
    return yaml.safe_load(path.read_text())["execution"]["config"]


prefmill_k8s_executor = k8s_job_executor.configured(executor_config(), name="prefmill_k8s_job_executor")

# The k8s executor replaces pipelines.definitions' recovering executor: run and step pods are separate hosts, and a
# dead run pod is the run monitoring's to fail (K8sRunLauncher checks run worker health; see deploy/k8s/dagster.yaml).
defs = build_definitions(executor=prefmill_k8s_executor)
