"""The deployment files pass the real tools (kubectl kustomize, kubernetes-validate, hadolint, docker-compose)
and our own rules, and each check fails on a broken copy, so a green run means something."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy import checks

Objects = list[dict[str, Any]]


@pytest.fixture(scope="module")
def objects() -> Objects:
    """The rendered kustomization plus the RayJob (kept out of it: its CRD exists only where KubeRay does)."""
    return checks.render_kustomization() + [doc for doc in yaml.safe_load_all(checks.RAYJOB.read_text()) if doc]


def find(objects: Objects, kind: str, name: str) -> dict[str, Any]:
    return next(obj for obj in objects if obj["kind"] == kind and obj["metadata"]["name"] == name)


def container(objects: Objects, deployment: str) -> dict[str, Any]:
    return find(objects, "Deployment", deployment)["spec"]["template"]["spec"]["containers"][0]


def test_the_tools_come_from_the_dev_requirements() -> None:
    for name in ("kubectl", "hadolint", "docker-compose"):
        assert Path(checks.tool(name)).exists()


def test_kubectl_kustomize_renders_the_four_services_and_the_volume(objects: Objects) -> None:
    rendered = {(obj["kind"], obj["metadata"]["name"]) for obj in objects}
    for name in ("nightcap-generation", "nightcap-retrieval", "nightcap-orchestrator", "nightcap-gateway"):
        assert ("Deployment", name) in rendered and ("Service", name) in rendered
    assert ("PersistentVolumeClaim", "nightcap-var") in rendered
    assert all(obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "nightcap" for obj in objects[:-1])


def test_a_kustomization_naming_a_missing_file_does_not_render(tmp_path: Path) -> None:
    broken = tmp_path / "k8s"
    shutil.copytree(checks.K8S, broken)
    kustomization = broken / "kustomization.yaml"
    kustomization.write_text(kustomization.read_text() + "  - missing.yaml\n")
    with pytest.raises(ValueError, match=r"missing\.yaml"):
        checks.render_kustomization(broken)


def test_every_object_validates_against_the_kubernetes_schemas(objects: Objects) -> None:
    assert checks.schema_problems(objects) == []


def test_a_misspelt_field_or_a_wrong_type_fails_schema_validation(objects: Objects) -> None:
    broken = copy.deepcopy(objects)
    pod = find(broken, "Deployment", "nightcap-retrieval")["spec"]["template"]["spec"]
    pod["containers"][0]["readinessProbe"]["grpc"]["prot"] = 50062
    find(broken, "Deployment", "nightcap-orchestrator")["spec"]["replicas"] = "two"
    head = find(broken, "RayJob", "nightcap-finetune")["spec"]["rayClusterSpec"]["headGroupSpec"]
    head["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = ["8Gi"]
    problems = "\n".join(checks.schema_problems(broken))
    assert "Deployment/nightcap-retrieval" in problems and "prot" in problems
    assert "Deployment/nightcap-orchestrator" in problems and "replicas" in problems
    assert "PodTemplate/rayjob-head" in problems


def test_the_dockerfile_passes_hadolint() -> None:
    assert checks.hadolint_problems() == []


def test_hadolint_fails_a_broken_dockerfile(tmp_path: Path) -> None:
    broken = tmp_path / "Dockerfile"
    text = checks.DOCKERFILE.read_text().replace("USER 1000:1000", "USER nightcap")
    broken.write_text(text + "RUN cd /tmp && apt-get install curl\n")
    problems = "\n".join(checks.hadolint_problems(broken))
    assert "DL3066" in problems  # a user name the host may not resolve
    assert "DL3003" in problems  # cd in RUN
    assert "DL3008" in problems  # an unpinned apt package


def test_every_file_the_dockerfile_copies_is_in_its_build_context() -> None:
    assert checks.ignored_copies() == []


def test_a_copied_folder_the_ignore_file_leaves_out_is_found(tmp_path: Path) -> None:
    ignore = tmp_path / "Dockerfile.dockerignore"
    ignore.write_text(checks.DOCKERIGNORE.read_text().replace("!training/\n", ""))
    assert checks.ignored_copies(checks.DOCKERFILE, ignore) == [
        "Dockerfile: COPY training: Dockerfile.dockerignore leaves it out of the context"
    ]


def test_compose_yaml_follows_the_compose_specification() -> None:
    assert checks.compose_problems() == []


def test_a_compose_file_off_the_specification_fails(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yaml"
    broken.write_text(checks.COMPOSE.read_text().replace("stop_grace_period: 15s", "stop_grace_perod: 15s"))
    problems = "\n".join(checks.compose_problems(broken))
    assert "stop_grace_perod" in problems and "not allowed" in problems


def test_manifests_have_probes_limits_a_locked_down_context_and_secrets(objects: Objects) -> None:
    assert checks.policy_problems(objects) == []


def test_each_rule_catches_a_manifest_that_breaks_it(objects: Objects) -> None:
    broken = copy.deepcopy(objects)
    generation = container(broken, "nightcap-generation")
    del generation["securityContext"]["readOnlyRootFilesystem"]
    del generation["resources"]["limits"]["memory"]
    generation["readinessProbe"]["grpc"]["port"] = 50051  # the TLS port: a plaintext gRPC probe would fail
    retrieval = container(broken, "nightcap-retrieval")
    retrieval["command"] = [w.replace("/etc/nightcap/tokens/", "/var/lib/nightcap/") for w in retrieval["command"]]
    orchestrator = find(broken, "Deployment", "nightcap-orchestrator")["spec"]["template"]["spec"]
    orchestrator["securityContext"]["runAsNonRoot"] = False
    orchestrator["containers"][0]["securityContext"].pop("runAsNonRoot")
    orchestrator["volumes"] = [v for v in orchestrator["volumes"] if v["name"] != "tokens"]
    worker = find(broken, "RayJob", "nightcap-finetune")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    worker["template"]["spec"]["containers"][0]["securityContext"]["capabilities"] = {}
    problems = "\n".join(checks.policy_problems(broken))
    assert "nightcap-generation/generation: securityContext.readOnlyRootFilesystem must be true" in problems
    assert "nightcap-generation/generation: no resources.limits.memory" in problems
    assert "readinessProbe calls port 50051, but --health-address serves port 50061" in problems
    assert "nightcap-retrieval/retrieval: --tokens-file /var/lib/nightcap/tokens is not in a mounted Secret" in problems
    assert "nightcap-orchestrator/orchestrator: securityContext.runAsNonRoot must be true" in problems
    assert "nightcap-orchestrator/orchestrator: mounts Secrets ['nightcap-tls']" in problems
    assert "RayJob/nightcap-finetune/gpu/ray-worker: securityContext.capabilities.drop must include ALL" in problems


def test_every_flag_in_the_manifests_and_compose_exists_in_the_code(objects: Objects) -> None:
    assert checks.flag_problems(objects) == []


def test_a_flag_the_code_does_not_have_is_caught(objects: Objects, tmp_path: Path) -> None:
    broken = copy.deepcopy(objects)
    generation = container(broken, "nightcap-generation")
    generation["command"] = [w.replace("--tokens-file", "--token-file") for w in generation["command"]]
    rayjob = find(broken, "RayJob", "nightcap-finetune")
    rayjob["spec"]["entrypoint"] = rayjob["spec"]["entrypoint"].replace("--num-workers", "--workers")
    compose = tmp_path / "compose.yaml"
    compose.write_text(checks.COMPOSE.read_text().replace("--health-address,", "--healthz,", 1))
    problems = "\n".join(checks.flag_problems(broken, compose))
    assert "Deployment/nightcap-generation/generation: services.generation serve has no flag --token-file" in problems
    assert "RayJob/nightcap-finetune/entrypoint: training/finetune.py has no flag --workers" in problems
    assert "compose/generation: services.generation serve has no flag --healthz" in problems


def test_ports_backends_and_ray_workers_agree_across_objects(objects: Objects) -> None:
    assert checks.consistency_problems(objects) == []


def test_disagreeing_ports_backends_or_worker_counts_are_caught(objects: Objects) -> None:
    broken = copy.deepcopy(objects)
    orchestrator = container(broken, "nightcap-orchestrator")
    orchestrator["command"] = [w.replace("nightcap-generation:", "nightcap-gen:") for w in orchestrator["command"]]
    retrieval = container(broken, "nightcap-retrieval")
    retrieval["command"] = [w.replace("0.0.0.0:50052", "0.0.0.0:50053") for w in retrieval["command"]]
    worker = find(broken, "RayJob", "nightcap-finetune")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    worker["replicas"] = 3
    worker["template"]["spec"]["containers"][0]["resources"]["limits"].pop("nvidia.com/gpu")
    problems = "\n".join(checks.consistency_problems(broken))
    assert "--generation dns:///nightcap-gen:50051 names no Service" in problems
    assert "--address 0.0.0.0:50053 but containerPort grpc is 50052" in problems
    assert "--num-workers 2 but the worker groups start 3 workers" in problems
    assert "--use-gpu but ray-worker has no nvidia.com/gpu limit" in problems


def test_the_gateway_is_probed_over_https_and_names_real_backends(objects: Objects) -> None:
    broken = copy.deepcopy(objects)
    gateway = container(broken, "nightcap-gateway")
    gateway["readinessProbe"]["httpGet"]["scheme"] = "HTTP"
    gateway["command"] = [w.replace("nightcap-orchestrator:", "nightcap-orch:") for w in gateway["command"]]
    problems = "\n".join(checks.policy_problems(broken) + checks.consistency_problems(broken))
    assert "nightcap-gateway/gateway: the gateway serves TLS, so its readinessProbe needs scheme HTTPS" in problems
    assert "--orchestrator nightcap-orch:50050 names no Service" in problems
    assert checks.flag_problems(objects) == []
