"""``deploy/kubernetes/`` offline: every manifest passes ``kubernetes-validate --strict`` (the
Kubernetes API schemas, no cluster), a broken copy fails it, and the rendered kustomization has
the topology of the issue: PostgreSQL, MLflow, a study-creator Job and an Indexed Job of GPU
workers whose index reaches ``--worker-index``, all non-root, no password outside the Secret.

The kustomization is rendered with ``kubectl kustomize`` when kubectl is installed, else by
:func:`render` here (resources, namespace, labels and images: the features it uses); a test
checks that both agree where kubectl exists.
"""

from __future__ import annotations

from collections.abc import Iterator
import copy
import json
from pathlib import Path
import re
import shutil
import subprocess
import sys
from typing import Any

import pytest
from sqlalchemy.engine import make_url
import typer
import yaml

from droptune.cli import app
from droptune.study.spec import spec_from_dict


ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE = ROOT / "deploy" / "kubernetes"
#: Namespaced kinds among those the kustomization uses (kustomize sets their namespace).
CLUSTER_SCOPED = {"Namespace"}
GPU = "nvidia.com/gpu"


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomization() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((KUSTOMIZE / "kustomization.yaml").read_text())
    return data


def render(folder: Path = KUSTOMIZE) -> list[dict[str, Any]]:
    """What ``kubectl kustomize FOLDER`` outputs for the features the kustomization uses:
    its resources in order, ``namespace`` on namespaced objects, ``labels`` (metadata only,
    as without includeSelectors/includeTemplates) and ``images``."""
    kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(kust) - {"apiVersion", "kind", "namespace", "labels", "resources", "images"}
    assert not unknown, f"render() does not implement {unknown}: extend it"
    out = []
    for resource in kust["resources"]:
        for doc in load_all(folder / resource):
            doc = copy.deepcopy(doc)
            meta = doc.setdefault("metadata", {})
            if kust.get("namespace") and doc["kind"] not in CLUSTER_SCOPED:
                meta["namespace"] = kust["namespace"]
            for entry in kust.get("labels", []):
                assert not entry.get("includeSelectors") and not entry.get("includeTemplates")
                meta.setdefault("labels", {}).update(entry["pairs"])
            for container in containers(doc):
                for image in kust.get("images", []):
                    if container["image"] == image["name"]:
                        tag = image.get("newTag")
                        container["image"] = image.get("newName", image["name"]) + (
                            f":{tag}" if tag else ""
                        )
            out.append(doc)
    return out


def kubectl_render() -> list[dict[str, Any]] | None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    result = subprocess.run(
        [kubectl, "kustomize", str(KUSTOMIZE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict[str, Any]]:
    """The rendered objects by (kind, name): kubectl's rendering where it exists."""
    docs = kubectl_render() or render()
    out = {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}
    assert len(out) == len(docs), "two objects with the same kind and name"
    return out


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    template = doc.get("spec", {}).get("template")
    return template["spec"] if template else None


def containers(doc: dict[str, Any], init: bool = True) -> Iterator[dict[str, Any]]:
    spec = pod_spec(doc)
    if spec is None:
        return
    yield from spec["containers"]
    if init:
        yield from spec.get("initContainers", [])


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


def only_container(doc: dict[str, Any]) -> dict[str, Any]:
    (container,) = list(containers(doc, init=False))
    return container


# ----------------------------------------------------------------------------------------------
# The files and the schema check.


def test_the_kustomization_lists_every_manifest_once() -> None:
    resources = kustomization()["resources"]
    assert len(resources) == len(set(resources))
    files = {p.name for p in KUSTOMIZE.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(resources) == files


def kubernetes_validate(*paths: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("kubernetes-validate")
    if not exe.exists():
        try:
            import kubernetes_validate  # noqa: F401
        except ImportError:
            pytest.skip("kubernetes-validate is not installed (pip install 'droptune[dev]')")
        found = shutil.which("kubernetes-validate")
        if found is None:
            pytest.skip("the kubernetes-validate command is not on PATH")
        exe = Path(found)
    return subprocess.run(
        [str(exe), "--strict", "--quiet", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_every_manifest_and_the_rendered_kustomization_pass_strict_validation(
    tmp_path: Path,
) -> None:
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(kubectl_render() or render(), sort_keys=False))
    files = [KUSTOMIZE / name for name in kustomization()["resources"]]
    result = kubernetes_validate(*files, rendered)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ERROR" not in result.stdout + result.stderr


BREAKAGES = {
    "unknown pod field": (
        "      restartPolicy: OnFailure\n      automountServiceAccountToken: false\n"
        "      # SIGTERM",
        "      restartPolicy: OnFailure\n      automountServiceAccountToken: false\n"
        "      gpusPerPod: 1\n      # SIGTERM",
    ),
    "wrong type": ("  completions: 4\n", "  completions: four\n"),
    "misspelt key": ("      tolerations:\n", "      toleration:\n"),
    "env without a name": ("            - name: MLFLOW_TRACKING_URI\n", "            - "),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_a_broken_manifest_fails_strict_validation(tmp_path: Path, breakage: str) -> None:
    text = (KUSTOMIZE / "workers.yaml").read_text()
    old, new = BREAKAGES[breakage]
    assert text.count(old) == 1, f"{old!r} is not once in workers.yaml"
    broken = tmp_path / "workers.yaml"
    broken.write_text(text.replace(old, new))
    result = kubernetes_validate(broken)
    assert result.returncode != 0, f"{breakage} passed the check"
    assert "did not validate" in result.stdout + result.stderr


def test_the_own_rendering_matches_kubectl_kustomize() -> None:
    rendered = kubectl_render()
    if rendered is None:
        pytest.skip("kubectl is not installed: only the test's own rendering is used")

    def by_key(docs: list[dict[str, Any]]) -> dict[str, str]:  # kubectl reorders by kind
        return {
            f"{doc['kind']}/{doc['metadata']['name']}": json.dumps(doc, sort_keys=True)
            for doc in docs
        }

    assert by_key(render()) == by_key(rendered)


# ----------------------------------------------------------------------------------------------
# The topology.


def test_the_objects_of_the_issue(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    assert set(objects) == {
        ("Namespace", "droptune"),
        ("Secret", "droptune-postgres"),
        ("ConfigMap", "postgres-init"),
        ("Service", "postgres"),
        ("StatefulSet", "postgres"),
        ("PersistentVolumeClaim", "mlflow-artifacts"),
        ("Service", "mlflow"),
        ("Deployment", "mlflow"),
        ("ConfigMap", "droptune-study"),
        ("Job", "droptune-study-creator"),
        ("Job", "droptune-worker"),
    }
    for (kind, _), doc in objects.items():
        if kind != "Namespace":
            assert doc["metadata"]["namespace"] == "droptune"
    labels = objects[("Namespace", "droptune")]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def parse_cli(args: list[str]) -> Any:
    """``args`` through droptune's real command line parser (nothing runs); its context."""
    group: Any = typer.main.get_command(app)  # (typer vendors its own click)
    name, *rest = args
    return group.commands[name].make_context(name, list(rest))


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' ``$(VAR)`` expansion of a container's args."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), arg) for arg in args]


def test_the_worker_job_is_indexed_on_gpus(
    objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    job = objects[("Job", "droptune-worker")]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["parallelism"] == spec["completions"] >= 1
    assert spec["backoffLimit"] >= spec["completions"]
    assert spec["template"]["spec"]["restartPolicy"] == "OnFailure"
    worker = only_container(job)
    resources = worker["resources"]
    assert resources["requests"][GPU] == resources["limits"][GPU] == 1

    # The index: from the Job's annotation, through the env, into --worker-index.
    env = env_of(worker)
    field = env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert field == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert worker["args"][:2] == ["worker", "/spec/study.yaml"]
    args = expand(worker["args"], {"JOB_COMPLETION_INDEX": "3"})
    ctx = parse_cli(args)
    assert ctx.params["worker_index"] == 3
    assert ctx.params["spec_path"] == Path("/spec/study.yaml")
    assert ctx.params["set_"] == ["train.accelerator=gpu", "train.devices=1"]
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow:5000"
    assert make_url(env["DROPTUNE_STORAGE"]["value"]).host == "postgres"


def test_the_study_creator_only_creates_the_study(
    objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    job = objects[("Job", "droptune-study-creator")]
    creator = only_container(job)
    assert creator["args"] == ["run", "/spec/study.yaml", "--workers", "0"]
    ctx = parse_cli(creator["args"])
    assert ctx.params["workers"] == 0
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure"
    assert GPU not in creator["resources"]["requests"]
    worker = only_container(objects[("Job", "droptune-worker")])
    for name in ("DROPTUNE_STORAGE", "PGPASSWORD", "MLFLOW_TRACKING_URI"):
        assert env_of(creator)[name] == env_of(worker)[name]  # the same study
    # both wait for the same services with the same script
    waits = [
        pod_spec(objects[("Job", name)])["initContainers"]  # type: ignore[index]
        for name in ("droptune-study-creator", "droptune-worker")
    ]
    assert waits[0] == waits[1]


def test_the_spec_in_the_configmap_is_a_valid_study(
    objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    text = objects[("ConfigMap", "droptune-study")]["data"]["study.yaml"]
    data = yaml.safe_load(text)
    spec = spec_from_dict(data, "study.yaml")
    assert spec.n_trials >= 1
    assert "storage" not in data and "uri" not in data.get("tracking", {})  # from the env
    spec.base.with_overrides({"train.accelerator": "gpu", "train.devices": 1})  # the workers'
    for doc in (objects[("Job", "droptune-worker")], objects[("Job", "droptune-study-creator")]):
        mounts = {m["name"]: m for m in only_container(doc)["volumeMounts"]}
        assert mounts["spec"]["mountPath"] == "/spec" and mounts["spec"]["readOnly"]
        volumes = {v["name"]: v for v in pod_spec(doc)["volumes"]}  # type: ignore[index]
        assert volumes["spec"]["configMap"]["name"] == "droptune-study"


def test_postgres_and_mlflow(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    postgres = objects[("StatefulSet", "postgres")]
    assert postgres["spec"]["serviceName"] == "postgres"
    (claim,) = postgres["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    container = only_container(postgres)
    for probe in ("readinessProbe", "livenessProbe"):
        assert "pg_isready" in container[probe]["exec"]["command"]
    env = env_of(container)
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "droptune-postgres"
    init = objects[("ConfigMap", "postgres-init")]["data"]
    sql = [line for line in (ROOT / "docker" / "postgres-init.sql").read_text().splitlines()]
    assert [s for s in sql if not s.startswith("--")] == init["10-mlflow.sql"].splitlines()

    mlflow = objects[("Deployment", "mlflow")]
    container = only_container(mlflow)
    args = container["args"]
    assert container["command"] == ["mlflow"] and args[0] == "server"
    assert "--backend-store-uri" not in args
    assert args[args.index("--artifacts-destination") + 1] == "/mlartifacts"
    assert "--serve-artifacts" in args
    allowed = args[args.index("--allowed-hosts") + 1].split(",")
    assert "mlflow:5000" in allowed and "localhost:*" in allowed  # Service, port-forward
    backend = make_url(env_of(container)["MLFLOW_BACKEND_STORE_URI"]["value"])
    assert (backend.host, backend.database) == ("postgres", "mlflow")
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health"
        (host,) = [h["value"] for h in get["httpHeaders"] if h["name"] == "Host"]
        assert host in allowed  # else MLflow answers the kubelet 403
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(mlflow)["volumes"]}  # type: ignore[index]
    claim_name = volumes[mounts["/mlartifacts"]]["persistentVolumeClaim"]["claimName"]
    assert claim_name == "mlflow-artifacts"


def test_every_pod_runs_non_root_with_resources(
    objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    pods = [doc for doc in objects.values() if pod_spec(doc) is not None]
    assert len(pods) == 4
    for doc in pods:
        name = doc["metadata"]["name"]
        pod = pod_spec(doc)
        assert pod is not None
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] > 0, name
        assert context["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod["automountServiceAccountToken"] is False, name
        for container in containers(doc):
            where = f"{name}/{container['name']}"
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert "runAsUser" not in sc or sc["runAsUser"] > 0, where
            requests, limits = container["resources"]["requests"], container["resources"]["limits"]
            assert {"cpu", "memory"} <= set(requests) and "memory" in limits, where


def test_the_image_is_the_kustomization_placeholder(
    objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    (image,) = kustomization()["images"]
    ours = f"{image['newName']}:{image['newTag']}"
    for doc in objects.values():
        for container in containers(doc):
            if container["name"] != "postgres":
                assert container["image"] == ours, container["name"]
    assert (ROOT / "Dockerfile").is_file()  # what builds it (docs/deploy.md)


#: ``scheme://user:password@``: a URL that carries a password.
URL_WITH_PASSWORD = re.compile(r"[\w+.-]+://[^\s/@:]*:[^\s/@]*@")


def test_no_password_outside_the_secret(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    secret = objects[("Secret", "droptune-postgres")]
    placeholder = secret["stringData"]["password"]
    assert placeholder == "change-me"  # a placeholder: docs/deploy.md says to replace it
    others = [doc for key, doc in objects.items() if key != ("Secret", "droptune-postgres")]
    assert placeholder not in json.dumps(others)
    for doc in objects.values():
        for container in containers(doc):
            for name, item in env_of(container).items():
                where = f"{doc['metadata']['name']}/{container['name']} {name}"
                if re.search(r"PASSWORD|SECRET|TOKEN", name):
                    assert "value" not in item, where
                    assert item["valueFrom"]["secretKeyRef"]["name"] == "droptune-postgres"
                assert not URL_WITH_PASSWORD.search(str(item.get("value", ""))), where
            for arg in container.get("args", []) + container.get("command", []):
                assert not URL_WITH_PASSWORD.search(arg), arg
                assert "password" not in arg.lower(), arg


def test_every_reference_resolves(objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Secrets, ConfigMaps, claims and Services named by the pods exist in the kustomization;
    every volume mount names a volume (or a claim template)."""
    secrets = {
        ref["secretKeyRef"]["name"]
        for doc in objects.values()
        for c in containers(doc)
        for item in c.get("env", [])
        for ref in [item.get("valueFrom", {})]
        if "secretKeyRef" in ref
    }
    assert secrets == {"droptune-postgres"}
    for name in secrets:
        assert ("Secret", name) in objects
    hosts = set()
    for doc in objects.values():
        pod = pod_spec(doc)
        if pod is None:
            continue
        templates = {c["metadata"]["name"] for c in doc["spec"].get("volumeClaimTemplates", [])}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for volume in volumes.values():
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in objects
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert ("PersistentVolumeClaim", claim) in objects
        for container in containers(doc):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes or mount["name"] in templates, mount
            for item in container.get("env", []):
                value = str(item.get("value", ""))
                if "://" in value:
                    hosts.add(make_url(value).host)
            for arg in container.get("args", []):  # the wait script's host names
                hosts.update(re.findall(r"http://([\w-]+):", arg))
                hosts.update(re.findall(r'\("([\w-]+)", \d+\)', arg))
    assert hosts == {"postgres", "mlflow"}
    for host in hosts:
        assert ("Service", host) in objects
    for name in ("postgres", "mlflow"):
        service = objects[("Service", name)]
        workload = objects[("StatefulSet" if name == "postgres" else "Deployment", name)]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        ports = {p["name"] for c in containers(workload) for p in c.get("ports", [])}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
