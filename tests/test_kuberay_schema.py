"""The RayJobs in infra/kuberay/ against KubeRay's own RayJob CRD (v1 openAPIV3Schema), as the API server
would check them, embedded RayCluster spec included; broken copies must fail.

The CRD is KubeRay's generated `ray.io_rayjobs.yaml`, read from $KUBERAY_RAYJOB_CRD (`.ci/run` points it at
the CI host's copy) or from `make kuberay-crd`'s download (.run/kuberay-crds/, pinned release + sha256).
With neither, the schema tests skip; the checks that need no CRD still run.

Kubernetes reads the schema as a *structural* schema, which plain JSON Schema does not: an object that
lists `properties` is closed (unknown fields are pruned, or rejected by `kubectl --validate=strict`) unless
it sets `x-kubernetes-preserve-unknown-fields: true`; `x-kubernetes-int-or-string` accepts both types;
`nullable` allows null; `x-kubernetes-list-type: map|set` forbids duplicate keys/items; `metadata` at the
root is ObjectMeta, checked by the API server itself. `k8s_jsonschema` turns those rules into JSON Schema
(Draft 4, OpenAPI's base) plus two keywords. Not checked: the CEL rules (`x-kubernetes-validations`).
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import REPO

CRD_ENV = "KUBERAY_RAYJOB_CRD"
DOWNLOADED_CRD = REPO / ".run" / "kuberay-crds" / "ray.io_rayjobs.yaml"  # where `make kuberay-crd` puts it
RAYJOBS = sorted((REPO / "infra" / "kuberay").glob("*.yaml"))

# ObjectMeta as the API server checks a custom resource's root `metadata` (the CRD only says `type: object`).
# Names are DNS-1123 subdomains; labels and annotations are string maps.
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 253,
                 "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"},
        "generateName": {"type": "string"},
        "namespace": {"type": "string", "maxLength": 63, "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
        # set by the server; accepted (and ignored) on apply
        "uid": {"type": "string"}, "resourceVersion": {"type": "string"}, "generation": {"type": "integer"},
        "creationTimestamp": {"type": ["string", "null"]}, "deletionTimestamp": {"type": "string"},
        "deletionGracePeriodSeconds": {"type": "integer"}, "selfLink": {"type": "string"},
        "managedFields": {"type": "array"},
    },
    "additionalProperties": False,
}


def k8s_jsonschema(node: dict, root: bool = True) -> dict:
    """A Kubernetes structural schema as JSON Schema with Kubernetes' unknown-field and type rules."""
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: k8s_jsonschema(sub, False) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = k8s_jsonschema(value, False)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [k8s_jsonschema(sub, False) for sub in value]
        else:
            out[key] = value
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if out.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", OBJECT_META)
    if root and "metadata" in out.get("properties", {}):
        out["properties"]["metadata"] = OBJECT_META
    is_object = out.get("type") == "object" or "properties" in out
    if is_object and not out.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in out:
        out["additionalProperties"] = False  # closed: fields not listed are unknown
    return out


def _list_type(validator, list_type, instance, schema):
    """x-kubernetes-list-type: `set` items and `map` keys (x-kubernetes-list-map-keys) must be unique."""
    if not validator.is_type(instance, "array"):
        return
    if list_type == "set":
        seen = []
        for item in instance:
            if item in seen:
                yield jsonschema.ValidationError(f"duplicate value {item!r} in a list of type set")
            seen.append(item)
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        item_props = schema.get("items", {}).get("properties", {})
        seen = set()
        for item in instance:
            if not isinstance(item, dict):
                continue
            # keys take their schema default before the comparison (e.g. a port's protocol: TCP)
            key = tuple(json.dumps(item.get(k, item_props.get(k, {}).get("default")), sort_keys=True) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(f"duplicate entry {dict(zip(keys, key, strict=True))} in a list "
                                                 f"of type map keyed by {keys}")
            seen.add(key)


K8sValidator = jsonschema.validators.extend(jsonschema.Draft4Validator, {"x-kubernetes-list-type": _list_type})
FORMATS = jsonschema.FormatChecker()


@FORMATS.checks("int32")
def _int32(value) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@FORMATS.checks("int64")
def _int64(value) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


def errors(validator, doc) -> list[str]:
    return sorted(f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
                  for e in validator.iter_errors(doc))


def crd_path() -> Path:
    configured = os.environ.get(CRD_ENV)
    if configured:
        path = Path(configured)
        if not path.is_file():
            pytest.fail(f"{CRD_ENV}={configured}: no such file")
        return path
    if DOWNLOADED_CRD.is_file():
        return DOWNLOADED_CRD
    pytest.skip(f"KubeRay's RayJob CRD is not available: set {CRD_ENV} to a copy of ray.io_rayjobs.yaml "
                f"or run `make kuberay-crd` (downloads the pinned release into {DOWNLOADED_CRD.relative_to(REPO)})")


@pytest.fixture(scope="module")
def rayjob_schema() -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD is 1.4 MB of YAML
    crd = yaml.load(crd_path().read_text(), Loader=loader)
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == "RayJob", crd["metadata"]
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert v1["served"], "the v1 RayJob API is not served by this CRD"
    return v1["schema"]["openAPIV3Schema"]


@pytest.fixture(scope="module")
def validator(rayjob_schema):
    schema = k8s_jsonschema(rayjob_schema)
    K8sValidator.check_schema(schema)
    return K8sValidator(schema, format_checker=FORMATS)


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_there_are_rayjobs():
    assert [p.name for p in RAYJOBS] == ["rayjob-evaluate.yaml", "rayjob-shard.yaml", "rayjob-train.yaml"]


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_passes_kuberays_schema(validator, path):
    job = load(path)
    found = errors(validator, job)
    assert not found, f"{path.name} fails KubeRay's RayJob schema:\n" + "\n".join(found)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"


def test_embedded_raycluster_spec_is_checked_field_by_field(rayjob_schema):
    """The RayCluster spec and its pod templates are closed in the CRD, so the field checks above reach them."""
    cluster = rayjob_schema["properties"]["spec"]["properties"]["rayClusterSpec"]
    head = cluster["properties"]["headGroupSpec"]["properties"]
    container = head["template"]["properties"]["spec"]["properties"]["containers"]["items"]
    for node in (cluster, head["template"], container):
        assert "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields")
    assert "authOptions" in cluster["properties"]  # KubeRay >= 1.6: token auth with a user Secret


def _container(job, worker=False):
    cluster = job["spec"]["rayClusterSpec"]
    group = cluster["workerGroupSpecs"][0] if worker else cluster["headGroupSpec"]
    return group["template"]["spec"]["containers"][0]


# Each mutation is one mistake the API server (strict field validation) rejects; `where` must be in an error.
BROKEN = {
    "unknown top-level spec field": (lambda j: j["spec"].update(entrypointTypo="python x.py"), "entrypointTypo"),
    "unknown RayCluster field": (lambda j: j["spec"]["rayClusterSpec"].update(rayVerison="2.60.0"), "rayVerison"),
    "unknown container field": (lambda j: _container(j).update(imagePullPolicyy="Always"), "imagePullPolicyy"),
    "unknown metadata field": (lambda j: j["metadata"].update(lables={"a": "b"}), "lables"),
    "replicas as a string": (lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(replicas="four"),
                             "workerGroupSpecs.0.replicas"),
    "boolean as a string": (lambda j: j["spec"].update(shutdownAfterJobFinishes="yes"), "shutdownAfterJobFinishes"),
    "rayStartParams value not a string": (
        lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
        "rayStartParams.num-cpus"),
    "memory limit that is no quantity": (lambda j: _container(j, worker=True)["resources"]["limits"].update(
        memory="900 gigabytes"), "limits.memory"),
    "auth mode outside the enum": (lambda j: j["spec"]["rayClusterSpec"].update(authOptions={"mode": "password"}),
                                   "authOptions.mode"),
    "duplicate env name (list-type map)": (
        lambda j: _container(j)["env"].append({"name": "MLFLOW_TRACKING_URI", "value": "http://x"}), "env"),
    "int32 out of range": (lambda j: j["spec"].update(ttlSecondsAfterFinished=2**40), "ttlSecondsAfterFinished"),
    "metadata name not DNS-1123": (lambda j: j["metadata"].update(name="Inception_Train"), "metadata.name"),
}


@pytest.mark.parametrize("mistake", list(BROKEN))
def test_broken_rayjob_fails_kuberays_schema(validator, mistake):
    mutate, where = BROKEN[mistake]
    job = load(REPO / "infra" / "kuberay" / "rayjob-train.yaml")
    assert errors(validator, job) == []
    broken = copy.deepcopy(job)
    mutate(broken)
    found = errors(validator, broken)
    assert any(where in e for e in found), f"{mistake}: expected an error at {where}, got {found}"


def test_structural_rules_of_the_adapter():
    """The Kubernetes rules the adapter adds, on a small schema (the RayJob CRD has no preserve-unknown node)."""
    schema = k8s_jsonschema({"type": "object", "properties": {
        "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
        "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"a": {"type": "string"}}},
        "map": {"type": "object", "additionalProperties": {"type": "string"}},
        "port": {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]},
        "bare_int_or_string": {"x-kubernetes-int-or-string": True},
        "maybe": {"type": "string", "nullable": True},
        "tags": {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"},
    }}, root=False)
    v = K8sValidator(schema, format_checker=FORMATS)
    ok = {"closed": {"a": "x"}, "open": {"a": "x", "anything": [1]}, "map": {"k": "v"}, "port": 8265,
          "bare_int_or_string": "50%", "maybe": None, "tags": ["a", "b"]}
    assert errors(v, ok) == []
    assert errors(v, {**ok, "port": "http"}) == [] and errors(v, {**ok, "bare_int_or_string": 3}) == []
    assert any("'b' was unexpected" in e for e in errors(v, {**ok, "closed": {"a": "x", "b": 1}}))
    assert any("'extra' was unexpected" in e for e in errors(v, {**ok, "extra": 1}))
    assert errors(v, {**ok, "port": 1.5}) and errors(v, {**ok, "map": {"k": 1}})
    assert any("duplicate value 'a'" in e for e in errors(v, {**ok, "tags": ["a", "a"]}))


# ----------------------------------------------------------------- checks that need no CRD

@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_name_fits_kuberays_limit(path):
    """KubeRay's operator (not the CRD) rejects RayJob names over 47 characters or not DNS-1035 labels."""
    name = load(path)["metadata"]["name"]
    assert len(name) <= 47 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_authenticates_ray_and_mlflow_from_secrets(path):
    """Ray token auth through KubeRay (token from the Secret `ray-auth`), MLflow credentials from the Secret
    `mlflow`; no secret value in the file."""
    text = path.read_text()
    job = yaml.safe_load(text)
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": "ray-auth"}
    for container in (_container(job), _container(job, worker=True)):
        env = {e["name"]: e for e in container["env"]}
        for name, key in (("MLFLOW_TRACKING_URI", "tracking-uri"), ("MLFLOW_TRACKING_USERNAME", "username"),
                          ("MLFLOW_TRACKING_PASSWORD", "password")):
            assert env[name] == {"name": name, "valueFrom": {"secretKeyRef": {"name": "mlflow", "key": key}}}
        # KubeRay injects RAY_AUTH_MODE/RAY_AUTH_TOKEN itself and keeps an explicit one: none may be set here
        assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(env)
    assert not re.search(r"(?i)(password|token)\s*[:=]\s*['\"]?[A-Za-z0-9+/_-]{12,}", text)
