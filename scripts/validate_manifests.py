#!/usr/bin/env python3
"""The checks of scripts/validate-manifests.sh, offline:

- every object of every shipped manifest, and of the kustomize output,
  against the Kubernetes OpenAPI schemas that kubernetes-validate (PyPI)
  bundles, strict: an unknown field is an error, and so is a kind with no
  schema;
- every WorkerPool against the generated CRD's openAPIV3Schema, strict as
  kubectl's default (server-side, strict) field validation is;
- every pod spec and the image against the secure defaults the manifests
  promise: Pod Security's `restricted` profile, a read-only root filesystem
  with an emptyDir /tmp, numeric ids that match the Dockerfile's USER; no
  `replicas` in a workload a WorkerPool scales;
- manifests/observability/: the PodMonitor and PrometheusRule against the
  prometheus-operator CRDs vendored in scripts/schemas/ (strict), the
  PrometheusRule generated from rules.yaml, the Grafana dashboard (parses,
  every panel has queries on the `${datasource}` variable), and fly.toml's
  [metrics] port being the one every process group serves /metrics on.

usage: validate_manifests.py REPO_ROOT [KUSTOMIZE_OUTPUT [OBSERVABILITY_KUSTOMIZE_OUTPUT]]
Prints every problem with its file and object; exits 1 on any.
"""

import copy
import json
import pathlib
import re
import subprocess
import sys

import tomllib

import jsonschema
import kubernetes_validate
import yaml

# The Kubernetes release whose schemas the manifests must meet.
K8S_VERSION = "1.37.0"
ROOT = pathlib.Path(sys.argv[1])
KUSTOMIZED = sys.argv[2] if len(sys.argv) > 2 else ""
OBSERVABILITY_KUSTOMIZED = sys.argv[3] if len(sys.argv) > 3 else ""
problems = []


def documents(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def name_of(doc):
    meta = doc.get("metadata") or {}
    return f"{doc.get('kind')}/{meta.get('name')}"


# --- WorkerPools against the CRD's openAPIV3Schema ---------------------------


def strict(schema):
    """A structural schema as JSON Schema: `nullable` allows null, and an
    object with `properties` rejects any other field (unless it preserves
    unknown fields), which is what `kubectl apply` (strict field validation)
    does with an unknown field."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if not isinstance(node, dict):
            return
        if node.pop("nullable", False) and "type" in node:
            node["type"] = [node["type"], "null"]
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for key in ("properties", "patternProperties"):
            for child in (node.get(key) or {}).values():
                walk(child)
        for key in ("items", "additionalProperties", "not"):
            walk(node.get(key))
        for key in ("oneOf", "anyOf", "allOf"):
            for child in node.get(key) or []:
                walk(child)

    walk(schema)
    return schema


# backlog's own CRD, and the prometheus-operator's for manifests/observability/.
crd_files = [ROOT / "manifests/crd.yaml", *sorted((ROOT / "scripts/schemas").glob("*.yaml"))]
crds = [d for path in crd_files for d in documents(path) if d.get("kind") == "CustomResourceDefinition"]
validators = {}
for crd in crds:
    spec = crd["spec"]
    for version in spec["versions"]:
        schema = strict(version["schema"]["openAPIV3Schema"])
        # apiVersion, kind and metadata are the API server's, not the schema's.
        schema["properties"].update(
            {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"}}
        )
        key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
        validators[key] = jsonschema.Draft4Validator(schema)


def served_by_our_crd(doc):
    group = (doc.get("apiVersion") or "").split("/")[0]
    return any(group == api_version.split("/")[0] and doc.get("kind") == kind for api_version, kind in validators)


def check_custom_resource(path, doc):
    validator = validators.get((doc.get("apiVersion"), doc.get("kind")))
    if validator is None:
        problems.append(f"{path}: {name_of(doc)}: {doc.get('apiVersion')} is not a version the CRD serves")
        return
    for error in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
        field = ".".join(str(p) for p in error.absolute_path) or "(root)"
        problems.append(f"{path}: {name_of(doc)}: {field}: {error.message}")


def check_builtin(path, doc):
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        field = ".".join(str(p) for p in error.path) or "(root)"
        problems.append(f"{path}: {name_of(doc)}: {field}: {error.message} (Kubernetes {K8S_VERSION}, strict)")
    except kubernetes_validate.SchemaNotFoundError:
        problems.append(
            f"{path}: {name_of(doc)}: Kubernetes {K8S_VERSION} has no {doc.get('kind')} in {doc.get('apiVersion')}"
        )


def check_objects(path, docs):
    for doc in docs:
        if served_by_our_crd(doc):
            check_custom_resource(path, doc)
        else:
            check_builtin(path, doc)


pool_files = sorted(
    {ROOT / "manifests/workerpools.yaml"}
    | set((ROOT / "manifests/examples").glob("*.yaml"))
    | set((ROOT / "manifests").glob("*/pools.yaml"))
)
checked_pools = 0
for path in pool_files:
    docs = documents(path)
    checked_pools += sum(1 for d in docs if d.get("kind") == "WorkerPool")
    if path.parent != ROOT / "manifests":
        check_objects(path.relative_to(ROOT), docs)

# --- secure defaults of every pod spec ---------------------------------------

dockerfile = (ROOT / "Dockerfile").read_text()
users = re.findall(r"^USER\s+(\S+)", dockerfile, re.M)
image_user = users[-1] if users else None
numeric_user = re.fullmatch(r"(\d+):(\d+)", image_user or "")
if not numeric_user:
    problems.append(
        f"Dockerfile: the final USER is {image_user!r}: it must be numeric uid:gid, or the kubelet "
        "cannot verify runAsNonRoot (\"image has non-numeric user\")"
    )
image_uid, image_gid = (int(numeric_user[1]), int(numeric_user[2])) if numeric_user else (None, None)

WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}


def pod_specs(doc):
    kind = doc.get("kind")
    if kind == "Pod":
        yield doc.get("spec") or {}
    elif kind in WORKLOADS:
        yield ((doc.get("spec") or {}).get("template") or {}).get("spec") or {}
    elif kind == "CronJob":
        yield (((doc.get("spec") or {}).get("jobTemplate") or {}).get("spec") or {}).get("template", {}).get("spec") or {}


def check_pod(where, pod):
    sc = pod.get("securityContext") or {}
    for field in ("runAsUser", "runAsGroup", "fsGroup"):
        value = sc.get(field)
        if not isinstance(value, int) or value == 0:
            problems.append(f"{where}: securityContext.{field} must be a non-zero number, is {value!r}")
    if sc.get("runAsNonRoot") is not True:
        problems.append(f"{where}: securityContext.runAsNonRoot must be true")
    if image_uid is not None and (sc.get("runAsUser"), sc.get("runAsGroup")) != (image_uid, image_gid):
        problems.append(
            f"{where}: runAsUser/runAsGroup {sc.get('runAsUser')}:{sc.get('runAsGroup')} differ from the "
            f"image's USER {image_uid}:{image_gid}"
        )
    # Only the controller talks to the Kubernetes API; any other pod with a
    # mounted token hands it to whatever runs in it.
    if not pod.get("serviceAccountName") and pod.get("automountServiceAccountToken") is not False:
        problems.append(
            f"{where}: automountServiceAccountToken must be false (a pod with no service account of its own "
            "does not use the API)"
        )
    pod_seccomp = (sc.get("seccompProfile") or {}).get("type")
    mounts_of_tmp_volumes = {
        v["name"] for v in pod.get("volumes") or [] if "emptyDir" in v
    }
    for container in (pod.get("initContainers") or []) + (pod.get("containers") or []):
        cwhere = f"{where}: container {container.get('name')}"
        # `command` replaces the image's ENTRYPOINT (tini): the binary would
        # run as PID 1, which the kernel shields from SIGTERM until it
        # installs a handler, so a pod stopped while starting would hang
        # for its whole grace period. `args` replaces only CMD.
        if "command" in container and (container.get("image") or "").startswith("backlog:"):
            problems.append(
                f"{cwhere}: use args, not command: command replaces the image's tini entrypoint"
            )
        csc = container.get("securityContext") or {}
        seccomp = (csc.get("seccompProfile") or {}).get("type") or pod_seccomp
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{cwhere}: seccompProfile must be RuntimeDefault (or Localhost), is {seccomp!r}")
        if csc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{cwhere}: securityContext.allowPrivilegeEscalation must be false")
        if csc.get("privileged"):
            problems.append(f"{cwhere}: must not be privileged")
        if "ALL" not in ((csc.get("capabilities") or {}).get("drop") or []):
            problems.append(f"{cwhere}: securityContext.capabilities.drop must include ALL")
        if (csc.get("capabilities") or {}).get("add"):
            problems.append(f"{cwhere}: adds capabilities")
        if csc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{cwhere}: securityContext.readOnlyRootFilesystem must be true")
        tmp = [m for m in container.get("volumeMounts") or [] if m.get("mountPath") == "/tmp"]
        if not tmp or tmp[0].get("name") not in mounts_of_tmp_volumes:
            problems.append(f"{cwhere}: /tmp must be an emptyDir volume (the root filesystem is read-only)")


manifest_files = sorted(p for p in (ROOT / "manifests").glob("*.yaml") if p.name != "kustomization.yaml")
pools_targets = set()
for path in manifest_files:
    for doc in documents(path):
        if doc.get("kind") == "WorkerPool":
            k8s = ((doc.get("spec") or {}).get("target") or {}).get("kubernetes")
            if k8s:
                pools_targets.add((k8s.get("kind"), k8s.get("name")))
pod_count = 0
for path in manifest_files:
    check_objects(path.relative_to(ROOT), documents(path))
    for doc in documents(path):
        for pod in pod_specs(doc):
            pod_count += 1
            check_pod(f"{path.relative_to(ROOT)}: {name_of(doc)}", pod)
        # The controller owns a target's count: `replicas` in the manifest
        # would be set back on every apply, deleting pods without a drain.
        meta = doc.get("metadata") or {}
        if (doc.get("kind"), meta.get("name")) in pools_targets and "replicas" in (doc.get("spec") or {}):
            problems.append(
                f"{path.relative_to(ROOT)}: {name_of(doc)}: spec.replicas must be left out: a WorkerPool "
                "scales it, and every `kubectl apply` would set it back"
            )

# Something on the cluster must apply the schema: without it /readyz stays
# 503 on a fresh database and the workers wait for it for good.
def applies_migrations(pod):
    for container in (pod.get("initContainers") or []) + (pod.get("containers") or []):
        argv = container.get("args") or container.get("command") or []
        env = {e.get("name"): e.get("value") for e in container.get("env") or []}
        if argv[:2] == ["api", "migrate"] or (argv[:1] == ["api"] and env.get("MIGRATE_ON_START") == "true"):
            return True
    return False


if not any(applies_migrations(pod) for path in manifest_files for doc in documents(path) for pod in pod_specs(doc)):
    problems.append(
        "manifests/: no pod applies the migrations (`api migrate`, or `api` with MIGRATE_ON_START=true): "
        "on a fresh database the API never becomes ready"
    )

# The namespace enforces what check_pod checks, so a pod spec that slips
# past it is refused at admission rather than run.
manifest_docs = [(path, doc) for path in manifest_files for doc in documents(path)]
namespaces = [d for _, d in manifest_docs if d.get("kind") == "Namespace"]
if not namespaces:
    problems.append("manifests/: no Namespace: Pod Security `restricted` must be enforced on backlog's namespace")
for ns in namespaces:
    labels = (ns.get("metadata") or {}).get("labels") or {}
    if labels.get("pod-security.kubernetes.io/enforce") != "restricted":
        problems.append(
            f"{name_of(ns)}: label pod-security.kubernetes.io/enforce must be restricted, is "
            f"{labels.get('pod-security.kubernetes.io/enforce')!r}"
        )

# --- the artifact store: one S3-compatible bucket all pods share -------------

config = next(
    (d for p in manifest_files for d in documents(p) if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == "backlog"),
    {},
)
store_url = (config.get("data") or {}).get("artifact-store", "")
if not store_url.startswith("s3://"):
    problems.append(
        f"manifests/config.yaml: artifact-store is {store_url!r}: the API and worker pods share no disk, "
        "so the default must be an S3-compatible bucket (s3://BUCKET/PREFIX)"
    )
# What each variable must come from: the ConfigMap's key or the Secret's.
S3_ENV = {
    "ARTIFACT_STORE": ("configMapKeyRef", "backlog", "artifact-store"),
    "AWS_REGION": ("configMapKeyRef", "backlog", "s3-region"),
    "AWS_ENDPOINT_URL": ("configMapKeyRef", "backlog", "s3-endpoint"),
    "AWS_ALLOW_HTTP": ("configMapKeyRef", "backlog", "s3-allow-http"),
    "AWS_ACCESS_KEY_ID": ("secretKeyRef", "backlog-s3", "access-key-id"),
    "AWS_SECRET_ACCESS_KEY": ("secretKeyRef", "backlog-s3", "secret-access-key"),
}
for path in manifest_files:
    for doc in documents(path):
        for pod in pod_specs(doc):
            for container in pod.get("containers") or []:
                env = {e["name"]: e for e in container.get("env") or []}
                if "ARTIFACT_STORE" not in env:
                    continue
                for name, (source, obj, key) in S3_ENV.items():
                    ref = ((env.get(name) or {}).get("valueFrom") or {}).get(source) or {}
                    if (ref.get("name"), ref.get("key")) != (obj, key):
                        problems.append(
                            f"{path.relative_to(ROOT)}: {name_of(doc)}: container {container.get('name')}: "
                            f"{name} must come from {source} {obj}/{key} (config.yaml)"
                        )

# --- manifests/observability/: dashboard, alerts, scrape config --------------

OBS = ROOT / "manifests/observability"
obs_files = sorted(p for p in OBS.glob("*.yaml") if p.name not in ("kustomization.yaml", "rules.yaml", "rules.test.yaml"))
for path in obs_files:
    check_objects(path.relative_to(ROOT), documents(path))
obs_objects = sum(len(documents(p)) for p in obs_files)

# Prometheus finds the PodMonitor and the PrometheusRule by their label,
# and the PodMonitor finds the pods by theirs: a renamed label or port
# would stop a scrape or an alert without an error anywhere.
obs_docs = [d for p in obs_files for d in documents(p)]
for doc in obs_docs:
    if doc.get("kind") in ("PodMonitor", "PrometheusRule"):
        labels = (doc.get("metadata") or {}).get("labels") or {}
        if labels.get("app.kubernetes.io/name") != "backlog":
            problems.append(
                f"manifests/observability: {name_of(doc)}: label app.kubernetes.io/name must be backlog "
                "(the operator's podMonitorSelector/ruleSelector, README)"
            )
for monitor in (d for d in obs_docs if d.get("kind") == "PodMonitor"):
    spec = monitor.get("spec") or {}
    selected = set()
    for expression in (spec.get("selector") or {}).get("matchExpressions") or []:
        if expression.get("key") == "app.kubernetes.io/name" and expression.get("operator") == "In":
            selected |= set(expression.get("values") or [])
    ports = {e.get("port") for e in spec.get("podMetricsEndpoints") or []}
    for path, doc in manifest_docs:
        if doc.get("kind") not in WORKLOADS:
            continue
        template = (doc.get("spec") or {}).get("template") or {}
        app = ((template.get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/name")
        where = f"{path.relative_to(ROOT)}: {name_of(doc)}"
        if app not in selected:
            problems.append(f"{where}: its pods ({app!r}) are not selected by {name_of(monitor)}: never scraped")
        served = {
            port.get("name")
            for container in (template.get("spec") or {}).get("containers") or []
            for port in container.get("ports") or []
        }
        if not ports & served:
            problems.append(f"{where}: no container port named {sorted(ports)} for {name_of(monitor)} to scrape")
kustomization = next(iter(documents(OBS / "kustomization.yaml")), {})
for generator in kustomization.get("configMapGenerator") or []:
    if "backlog-dashboard.json" in generator.get("files") or []:
        labels = (generator.get("options") or {}).get("labels") or {}
        if labels.get("grafana_dashboard") != "1":
            problems.append(
                'manifests/observability/kustomization.yaml: the dashboard ConfigMap needs label grafana_dashboard: "1" '
                "(Grafana's dashboard sidecar loads by it)"
            )

generated = subprocess.run(
    [sys.executable, str(ROOT / "scripts/observability-rules.py"), "--check"], capture_output=True, text=True
)
if generated.returncode != 0:
    problems.append(generated.stderr.strip() or "scripts/observability-rules.py --check failed")

dashboard_path = OBS / "backlog-dashboard.json"
dashboard_panels = 0
try:
    dashboard = json.loads(dashboard_path.read_text())
except (OSError, ValueError) as error:
    problems.append(f"{dashboard_path.relative_to(ROOT)}: not a JSON document: {error}")
    dashboard = {}
if dashboard:
    where = dashboard_path.relative_to(ROOT)
    if not isinstance(dashboard.get("schemaVersion"), int) or dashboard["schemaVersion"] < 36:
        problems.append(f"{where}: schemaVersion must be a number of Grafana 9 or later, is {dashboard.get('schemaVersion')!r}")
    for field in ("uid", "title"):
        if not dashboard.get(field):
            problems.append(f"{where}: no {field}")
    variables = {v.get("name"): v for v in (dashboard.get("templating") or {}).get("list") or []}
    if (variables.get("datasource") or {}).get("type") != "datasource" or variables["datasource"].get("query") != "prometheus":
        problems.append(f"{where}: the `datasource` template variable (a Prometheus data source) is missing")
    ids = set()
    for panel in dashboard.get("panels") or []:
        title = panel.get("title")
        if panel.get("id") in ids:
            problems.append(f"{where}: panel {title!r}: id {panel.get('id')} is used twice")
        ids.add(panel.get("id"))
        if panel.get("type") == "row":
            continue
        dashboard_panels += 1
        grid = panel.get("gridPos") or {}
        if not all(isinstance(grid.get(k), int) for k in ("x", "y", "w", "h")) or grid["x"] + grid["w"] > 24:
            problems.append(f"{where}: panel {title!r}: gridPos must place it within the 24 columns")
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"{where}: panel {title!r} has no targets")
        for source in [panel.get("datasource")] + [t.get("datasource") for t in targets]:
            if (source or {}).get("uid") != "${datasource}":
                problems.append(f"{where}: panel {title!r}: its data source must be the ${{datasource}} variable")
        for target in targets:
            if not (target.get("expr") or "").strip():
                problems.append(f"{where}: panel {title!r}: target {target.get('refId')} has no expr")

# Fly's Prometheus scrapes one port on every machine: each process group
# must serve /metrics on it.
fly = tomllib.loads((ROOT / "fly.toml").read_text())
fly_metrics = fly.get("metrics") or {}
scrape_port = fly_metrics.get("port")
if fly_metrics.get("path") != "/metrics":
    problems.append(f"fly.toml: [metrics] path must be /metrics, is {fly_metrics.get('path')!r}")
for variable in ("METRICS_ADDR", "WORKER_METRICS_ADDR", "CONTROLLER_METRICS_ADDR"):
    address = (fly.get("env") or {}).get(variable, "")
    host, _, port = address.rpartition(":")
    if host != "0.0.0.0" or port != str(scrape_port):
        problems.append(
            f"fly.toml: [env] {variable} is {address!r}: it must be 0.0.0.0:{scrape_port}, the port [metrics] scrapes"
        )

# --- the kustomize output: what `kubectl apply -k manifests/` sends -----------

objects = sum(len(documents(p)) for p in manifest_files)
if KUSTOMIZED:
    kustomized = documents(KUSTOMIZED)
    objects += len(kustomized)
    check_objects("kubectl kustomize manifests/", kustomized)
if OBSERVABILITY_KUSTOMIZED:
    kustomized = documents(OBSERVABILITY_KUSTOMIZED)
    obs_objects += len(kustomized)
    check_objects("kubectl kustomize manifests/observability/", kustomized)
    dashboards = [d for d in kustomized if d.get("kind") == "ConfigMap" and "backlog-dashboard.json" in (d.get("data") or {})]
    if len(dashboards) != 1 or json.loads(dashboards[0]["data"]["backlog-dashboard.json"]) != dashboard:
        problems.append("kubectl kustomize manifests/observability/: no ConfigMap carries backlog-dashboard.json as is")

for problem in problems:
    print(f"error: {problem}")
print(
    f"validate-manifests: {objects} object(s) of manifests/ and its kustomize output against Kubernetes "
    f"{K8S_VERSION} (strict), {checked_pools} WorkerPool example(s) against the CRD, {pod_count} pod "
    f"spec(s) against the secure defaults, {obs_objects} observability object(s) against the "
    f"prometheus-operator CRDs and {dashboard_panels} dashboard panel(s): {len(problems)} problem(s)"
)
sys.exit(1 if problems else 0)
