"""The cluster recipes in examples/ parse and use only what Ray documents: the `ray job submit` options of the
installed Ray's own command-line parser, the KubeRay RayJob fields, and the cluster-config schema Ray ships for
`ray up`; each recipe's entrypoint is a sweep this project composes."""

import json
import re
import shlex
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from bench.config import compose

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
ENTRY = ["python", "-m", "bench.run"]


def check_entrypoint(words: list[str]) -> None:
    """`python -m bench.run SWEEP key=value ...`: the sweep exists and the overrides compose."""
    assert words[:3] == ENTRY, words
    sweep, overrides = words[3], words[4:]
    assert (ROOT / sweep).is_file()
    cfg = compose(ROOT / sweep, overrides)
    assert cfg.output_dir is None  # where runs go is the job's DIFFSEG_STORAGE, not a path in the image


def check_runtime_env(env: dict) -> None:
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)  # Ray's own validation of the fields
    assert env["env_vars"]["DIFFSEG_STORAGE"].startswith("s3://")


def test_the_job_submit_recipe_uses_the_options_of_rays_job_client():
    from ray.dashboard.modules.job.cli import submit

    text = (EXAMPLES / "ray_job_submit.sh").read_text()
    command = re.search(r"^ray job submit.*?(?<!\\)$", text.replace("\\\n", " "), re.MULTILINE | re.DOTALL)
    assert command, "no `ray job submit` command"
    words = shlex.split(command.group(0).replace("$RAY_ADDRESS", "http://head:8265")
                        .replace("$DIFFSEG_STORAGE", "s3://bucket/runs").replace('"$', '"'))[3:]
    ctx = submit.make_context("submit", list(words))  # click parses exactly as `ray job submit` would
    assert ctx.params["address"] == "http://head:8265" and ctx.params["working_dir"] == "."
    check_runtime_env(json.loads(ctx.params["runtime_env_json"]))
    check_entrypoint(list(ctx.params["entrypoint"]))


KUBERAY_SPEC = {"entrypoint", "runtimeEnvYAML", "rayClusterSpec", "clusterSelector", "shutdownAfterJobFinishes",
                "ttlSecondsAfterFinished", "submissionMode", "activeDeadlineSeconds", "backoffLimit",
                "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "metadata", "suspend",
                "submitterPodTemplate", "submitterConfig", "managedBy", "deletionStrategy"}
KUBERAY_CLUSTER = {"rayVersion", "headGroupSpec", "workerGroupSpecs", "enableInTreeAutoscaling", "autoscalerOptions",
                   "headServiceAnnotations", "suspend", "gcsFaultToleranceOptions", "managedBy"}
KUBERAY_HEAD = {"rayStartParams", "template", "serviceType", "headService", "enableIngress"}
KUBERAY_WORKER = {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template",
                  "scaleStrategy", "numOfHosts", "suspend", "idleTimeoutSeconds"}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}


def test_the_kuberay_rayjob_uses_only_documented_fields():
    text = (EXAMPLES / "kuberay_rayjob.yaml").read_text()
    assert "NOT RUN ON A REAL CLUSTER" in text
    job = yaml.safe_load(text)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert set(spec) <= KUBERAY_SPEC, set(spec) - KUBERAY_SPEC
    assert spec["submissionMode"] in SUBMISSION_MODES and spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int)
    check_entrypoint(shlex.split(spec["entrypoint"]))
    check_runtime_env(yaml.safe_load(spec["runtimeEnvYAML"]))
    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= KUBERAY_CLUSTER, set(cluster) - KUBERAY_CLUSTER
    assert cluster["rayVersion"] == version("ray")  # the Ray this project is tested with
    head, workers = cluster["headGroupSpec"], cluster["workerGroupSpecs"]
    assert set(head) <= KUBERAY_HEAD and all(set(w) <= KUBERAY_WORKER for w in workers)
    for group in [head, *workers]:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())  # KubeRay wants strings
        containers = group["template"]["spec"]["containers"]
        assert containers and all(c["name"] and c["image"] for c in containers)
    for worker in workers:
        assert worker["minReplicas"] <= worker["replicas"] <= worker["maxReplicas"]


def test_the_ray_up_cluster_config_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    text = (EXAMPLES / "ray_cluster.yaml").read_text()
    assert "NOT RUN ON A REAL CLUSTER" in text
    config = yaml.safe_load(text)
    validate_config(prepare_config(config))  # as `ray up` does: defaults merged, then ray-schema.json
    assert config["head_node_type"] in config["available_node_types"]
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    assert any("DIFFSEG_STORAGE=s3://" in c for c in config["setup_commands"])


@pytest.mark.parametrize("name", ["ray_job_submit.sh", "kuberay_rayjob.yaml", "ray_cluster.yaml"])
def test_the_recipes_are_in_the_cluster_page(name):
    assert f"examples/{name}" in (ROOT / "docs" / "cluster.md").read_text()
