"""deploy/k8s: every Kustomize directory renders with `kubectl kustomize`, validates against the Kubernetes schemas
(kubernetes-validate, strict: unknown fields are errors) for the oldest and newest Kubernetes we support, lints
with yamllint, and hangs together: selectors match, probes hit /health, the container's arguments parse with
`berry serve`'s own parser, the grace period covers the drain, the autoscaler's metric is one the server exports.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
DIRS = sorted(p.parent.relative_to(K8S).as_posix() for p in K8S.rglob("kustomization.yaml"))
VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]  # oldest supported upstream release .. newest known
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}  # not in the core schemas: cross-checked below
LINT = YamlLintConfig("""extends: default
rules:
  line-length: {max: 120}
  document-start: disable
  comments: {min-spaces-from-content: 2}
  comments-indentation: disable
  truthy: {check-keys: false}
""")


def kubectl() -> str:
    found = shutil.which("kubectl") or shutil.which("kubectl", path=str(Path(sys.executable).parent))
    assert found, "kubectl not found: `make install-test` installs it"
    return found


def render(d: str) -> list[dict]:
    r = subprocess.run([kubectl(), "kustomize", str(K8S / d)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [doc for doc in yaml.safe_load_all(r.stdout) if doc]


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def container(docs: list[dict]) -> dict:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def serve_args(docs: list[dict]) -> argparse.Namespace:
    """The container's ENTRYPOINT (from the Dockerfile) + args, parsed by `berry serve`'s real argument parser."""
    from berrylm.serve.cli import register

    entry = None
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.startswith("ENTRYPOINT"):
            entry = json.loads(line.split(None, 1)[1])  # the last one: the default (runtime) target
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="cmd"))
    assert entry[0] == "berry"
    return parser.parse_args(entry[1:] + container(docs).get("args", []))


def test_there_is_a_base_and_cpu_and_gpu_overlays():
    assert {"base", "overlays/cpu", "overlays/gpu", "monitoring"} <= set(DIRS)


@pytest.mark.parametrize("d", DIRS)
def test_renders_and_validates_against_the_kubernetes_schemas(d):
    docs = render(d)
    assert docs
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            continue
        for version in VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as e:
                pytest.fail(f"{d}: {doc['kind']}/{doc['metadata']['name']} against {version}: {e.message} at "
                            f"{'.'.join(map(str, e.path))}")


def test_yaml_lints_clean():
    files = sorted(K8S.rglob("*.yaml"))
    assert len(files) >= 10
    problems = [f"{f.relative_to(REPO)}:{p.line}: {p.desc}" for f in files
                for p in linter.run(f.read_text(), LINT, str(f))]
    for d in DIRS:  # and what kubectl renders from them
        r = subprocess.run([kubectl(), "kustomize", str(K8S / d)], capture_output=True, text=True, timeout=60)
        problems += [f"rendered {d}:{p.line}: {p.desc}" for p in linter.run(r.stdout, LINT)
                     if p.level == "error" and p.rule not in ("indentation",)]  # kubectl's own list style
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("d", ["overlays/cpu", "overlays/gpu"])
def test_overlay_is_a_production_deployment(d):
    docs = render(d)
    dep = one(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = container(docs)
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in dep["spec"]["selector"]["matchLabels"].items())
    assert {d["metadata"]["namespace"] for d in docs} == {"berrylm"}
    # non-root, read-only root filesystem, nothing extra
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] and not c["securityContext"]["allowPrivilegeEscalation"]
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert "/tmp" in mounts  # the one writable place
    # requests and limits
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert c["resources"]["limits"]["memory"]
    # probes: startup for the model load, liveness and readiness on /health (liveness stays up while draining)
    port = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"].split("?")[0] == "/health" and get["port"] in port
    assert c["livenessProbe"]["httpGet"]["path"] == "/health?probe=live"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    start = c["startupProbe"]
    assert start["periodSeconds"] * start["failureThreshold"] >= 120  # minutes for a model load, not seconds
    # the arguments are ones `berry serve` accepts, and the grace period covers the drain
    args = serve_args(docs)
    assert args.drain_delay > 0 and args.drain_timeout is not None
    assert pod["terminationGracePeriodSeconds"] >= args.drain_delay + args.drain_timeout + 5
    readiness = c["readinessProbe"]
    assert readiness["periodSeconds"] * readiness["failureThreshold"] <= args.drain_delay  # out before it closes
    # the API key from a Secret; the model from a ConfigMap that exists in the render (generated name)
    env = {e["name"]: e for e in c["env"]}
    assert env["BERRY_API_KEY"]["valueFrom"]["secretKeyRef"]["key"]
    cm = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    assert [r["configMapRef"]["name"] for r in c["envFrom"]][0] in cm
    # the model volume: a PVC of the render, mounted read-only at /models
    vols = {v["name"]: v for v in pod["volumes"]}
    claim = vols[mounts["/models"]["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == one(docs, "PersistentVolumeClaim")["metadata"]["name"] and mounts["/models"]["readOnly"]
    # the Service, the PodDisruptionBudget and the autoscaler point at these pods
    svc = one(docs, "Service")
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= set(port)
    assert svc["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert "replicas" not in dep["spec"]  # the autoscaler owns the count
    if d.endswith("gpu"):
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and args.device == "cuda"
        assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Pods"]  # queue depth, not CPU
    else:
        assert args.device in ("auto", "cpu") and args.threads
        assert [m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"] == ["cpu"]
        assert c["resources"]["limits"].get("cpu") == c["resources"]["requests"]["cpu"]


def exported_metrics() -> set[str]:
    from berrylm.serve.metrics import Metrics

    return set(re.findall(r"^# TYPE (\w+) ", Metrics("m").render().decode(), re.M))


def test_queue_depth_autoscaler_reads_a_metric_the_server_exports():
    """prometheus-adapter's rule turns berry_queue_depth into the custom metric the gpu overlay's HPA reads."""
    rules = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter.yaml").read_text())["rules"]["custom"]
    hpa = one(render("overlays/gpu"), "HorizontalPodAutoscaler")
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    served = {r["name"]["as"] for r in rules}
    assert wanted and wanted <= served
    for r in rules:
        series = re.match(r"(\w+)\{", r["seriesQuery"]).group(1)
        assert series in exported_metrics() and re.fullmatch(r["name"]["matches"], series)
        assert set(r["resources"]["overrides"]) == {"namespace", "pod"}


def test_service_monitor_selects_the_service():
    mon = one(render("monitoring"), "ServiceMonitor")
    svc = one(render("overlays/cpu"), "Service")
    assert mon["metadata"]["namespace"] == svc["metadata"]["namespace"]
    assert all(svc["metadata"]["labels"].get(k) == v for k, v in mon["spec"]["selector"]["matchLabels"].items())
    ports = {p["name"] for p in svc["spec"]["ports"]}
    assert all(e["port"] in ports and e["path"] == "/metrics" for e in mon["spec"]["endpoints"])
