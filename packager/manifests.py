"""Kubernetes manifests for a fleet of Triton servers reading one model repository in object storage.

Two files, rendered from packager/templates/k8s/ by the Jinja environment of the Triton configs: fleet.yaml (a
Deployment of tritonservers in poll or explicit mode, and its Service) and kserve.yaml (a KServe InferenceService
on KServe's Triton runtime, and the ServiceAccount that hands it the credentials Secret). The recipe's [deploy]
section gives the resources, replicas and model-control mode; the Triton release gives the image.

Every rendered document is parsed with yaml.safe_load and checked against the Kubernetes object schema as the
`kubernetes` Python client models it (its pydantic models, strict: unknown fields, wrong types and missing required
fields are refused), and every resource quantity with the client's parse_quantity. KServe's InferenceService is a
custom resource the client does not model: its metadata, pod and container parts are checked with the client's
V1ObjectMeta, V1PodSpec and V1Container, and KServe's own few fields (minReplicas, maxReplicas, modelFormat,
runtimeVersion, storageUri) explicitly here. Nothing is applied: no cluster is reached.
"""

from __future__ import annotations

import os
import re
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import jinja2
import pydantic
import yaml
from kubernetes import client as k8s
from kubernetes.utils import parse_quantity

from packager.errors import PackagerError, UsageError, first_line
from packager.recipe import Deploy, Recipe
from packager.releases import tritonserver_image
from packager.templating import environment
from packager.triton.process import CPU_FLAGS

# The file each template renders into.
TEMPLATES = {"fleet.yaml": "k8s/fleet.yaml.j2", "kserve.yaml": "k8s/kserve.yaml.j2"}
READY_PATH, LIVE_PATH = "/v2/health/ready", "/v2/health/live"
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")  # required keys of the credentials Secret
STARTUP_FAILURES = 30  # the fleet's startupProbe: 30 x 10 s for the first load from object storage
KSERVE_HTTP_PORT = 8080  # KServe's Triton runtime (kserve-tritonserver) starts the server with --http-port=8080
KSERVE_LIVE_DELAY_S = 30  # no startupProbe there (Knative): the liveness probe waits this long for the first load
GPU_RESOURCE = "nvidia.com/gpu"
MANAGER = "triton-packager"

# The Kubernetes objects the templates render, by (apiVersion, kind): the client's model of each.
KUBERNETES_MODELS: dict[tuple[str, str], type[pydantic.BaseModel]] = {
    ("apps/v1", "Deployment"): k8s.V1Deployment,
    ("v1", "Service"): k8s.V1Service,
    ("v1", "ServiceAccount"): k8s.V1ServiceAccount,
}
INFERENCE_SERVICE = ("serving.kserve.io/v1beta1", "InferenceService")
# KServe's own fields of an InferenceService's predictor and of its model; the rest of each is a PodSpec (the
# predictor) or a Container (the model), checked with the client's models.
KSERVE_PREDICTOR_FIELDS = {"minReplicas": int, "maxReplicas": int, "model": dict}
KSERVE_MODEL_FIELDS = {"modelFormat": dict, "runtime": str, "runtimeVersion": str, "storageUri": str,
                       "protocolVersion": str}
KSERVE_CONTAINER = "kserve-container"  # the name KServe gives the model's container
QUANTITY_KEYS = ("requests", "limits", "sizeLimit")  # whose values (or whose own values) are quantities

_DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")  # RFC 1035 label: Service and InferenceService names
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


@dataclass(frozen=True)
class Port:
    name: str
    number: int


PORTS = (Port("http", 8000), Port("grpc", 8001), Port("metrics", 8002))


@dataclass(frozen=True)
class Fleet:
    """What the templates read besides [deploy]: names, image, repository URIs, server arguments, resources."""

    name: str  # Deployment, Service and ServiceAccount
    service_name: str  # InferenceService
    image: str
    runtime_version: str  # the image tag KServe's Triton runtime runs
    storage_uri: str  # s3://bucket/prefix, for KServe's storage initializer
    endpoint_url: str  # "" for AWS itself
    server_args: tuple[str, ...]
    resources: dict[str, str]  # requested and limited alike
    shm_quantity: str
    labels: dict[str, str]  # the fleet's objects and pods
    selector: dict[str, str]
    kserve_labels: dict[str, str]  # KServe's objects (and its pods: never the fleet Service's selector)
    ports: tuple[Port, ...] = PORTS
    secret_keys: tuple[str, ...] = SECRET_KEYS
    ready_path: str = READY_PATH
    live_path: str = LIVE_PATH
    startup_failures: int = STARTUP_FAILURES
    kserve_http_port: int = KSERVE_HTTP_PORT
    kserve_live_delay_s: int = KSERVE_LIVE_DELAY_S


@dataclass(frozen=True)
class Manifest:
    """One rendered file: its text and its parsed, checked documents."""

    file: str
    text: str
    objects: tuple[dict, ...]

    def describe(self) -> str:
        return ", ".join(f"{o['kind']} {o['metadata']['name']}" for o in self.objects)


def render_manifests(recipe: Recipe, repository: str, endpoint_url: str | None = None) -> list[Manifest]:
    """fleet.yaml and kserve.yaml for `recipe` serving `repository` (s3://bucket/prefix), each checked."""
    fleet = fleet_of(recipe, repository, endpoint_url)
    rendered = []
    for file, template in TEMPLATES.items():
        try:
            text = environment().get_template(template).render(fleet=fleet, deploy=recipe.deploy)
        except jinja2.TemplateError as exc:
            raise PackagerError(f"template {template}: {first_line(exc)}") from None
        rendered.append(Manifest(file, text, check_documents(text, template)))
    return rendered


def write_manifests(manifests: list[Manifest], folder: Path) -> list[Path]:
    """Each file written whole (a temporary file renamed over it); the paths written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PackagerError(f"cannot create {folder}: {exc.strerror}") from None
    paths = []
    for manifest in manifests:
        path = folder / manifest.file
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{manifest.file}.")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                stream.write(manifest.text)
            os.replace(temporary, path)
        except OSError as exc:
            Path(temporary).unlink(missing_ok=True)
            raise PackagerError(f"cannot write {path}: {exc.strerror}") from None
        paths.append(path)
    return paths


def fleet_of(recipe: Recipe, repository: str, endpoint_url: str | None = None) -> Fleet:
    """The templates' values for `recipe`; UsageError for a repository, endpoint or [deploy] the fleet cannot use."""
    deploy, release = recipe.deploy, recipe.tensorrt.triton_release
    if recipe.serving.device == "gpu" and deploy.gpus == 0:
        raise UsageError(f"recipe {recipe.name}: [serving] device is \"gpu\" but [deploy] gpus is 0: its models need "
                         "a GPU in every server")
    bucket, prefix = _s3_location(repository)
    endpoint = _endpoint(endpoint_url) if endpoint_url else ""
    storage_uri = f"s3://{bucket}/{prefix}".rstrip("/")
    base = recipe.name.replace("_", "-").lower()
    name = f"{base}-triton"
    for candidate in (base, name):
        if not _DNS_LABEL.fullmatch(candidate):
            raise UsageError(f"recipe name {recipe.name!r} gives the Kubernetes name {candidate!r}, which is not a "
                             "DNS label (a letter first, then lowercase letters, digits and '-', at most 63)")
    selector = {"app.kubernetes.io/name": "tritonserver", "app.kubernetes.io/instance": name}
    common = {"app.kubernetes.io/version": release, "app.kubernetes.io/part-of": recipe.name,
              "app.kubernetes.io/managed-by": MANAGER}
    return Fleet(
        name=name,
        service_name=base,
        image=deploy.image or tritonserver_image(release),
        runtime_version=f"{release}-py3",
        storage_uri=storage_uri,
        endpoint_url=endpoint,
        # Triton reads an S3-compatible endpoint from the repository URI itself: s3://http://host:port/bucket/prefix
        server_args=_server_args(deploy, storage_uri.replace("s3://", f"s3://{endpoint}/", 1) if endpoint
                                 else storage_uri),
        resources=_resources(deploy),
        shm_quantity=f"{deploy.shm_mib}Mi",
        labels={**selector, **common},
        selector=selector,
        kserve_labels={"app.kubernetes.io/name": "tritonserver", "app.kubernetes.io/instance": base, **common},
    )


def _server_args(deploy: Deploy, repository: str) -> tuple[str, ...]:
    if deploy.model_control == "poll":
        control = ("--model-control-mode=poll", f"--repository-poll-secs={deploy.poll_seconds}")
    else:  # explicit: every model of the repository at start, later ones over the repository API
        control = ("--model-control-mode=explicit", "--load-model=*")
    ports = tuple(f"--{port.name}-port={port.number}" for port in PORTS)
    return (f"--model-repository={repository}", *control, *ports, *(() if deploy.gpus else CPU_FLAGS))


def _resources(deploy: Deploy) -> dict[str, str]:
    resources = {"cpu": deploy.cpu_quantity, "memory": f"{deploy.memory_mib}Mi"}
    if deploy.gpus:
        resources[GPU_RESOURCE] = str(deploy.gpus)
    return resources


def _s3_location(repository: str) -> tuple[str, str]:
    """(bucket, prefix) of s3://bucket[/prefix]; UsageError otherwise."""
    if not repository.startswith("s3://"):
        raise UsageError(f"--repository {repository!r}: a fleet reads object storage; give s3://bucket/prefix")
    bucket, _, prefix = repository.removeprefix("s3://").partition("/")
    if not _BUCKET.fullmatch(bucket):
        hint = "; an S3-compatible endpoint goes in --s3-endpoint" if ":" in bucket else ""
        raise UsageError(f"--repository {repository!r}: {bucket!r} is not an S3 bucket name (3-63 lowercase letters, "
                         f"digits, '.', '-'){hint}")
    prefix = prefix.strip("/")
    if "//" in prefix or any(c.isspace() for c in prefix):
        raise UsageError(f"--repository {repository!r}: the prefix has an empty folder or a space")
    return bucket, prefix


def _endpoint(url: str) -> str:
    """An S3-compatible endpoint http(s)://host[:port], as given; UsageError otherwise."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.path.strip("/") or parsed.query:
        raise UsageError(f"--s3-endpoint {url!r}: give http(s)://host[:port]")
    return f"{parsed.scheme}://{parsed.netloc}"


# ---- checking against the Kubernetes object schema ---------------------------------------------------------------


def check_documents(text: str, where: str) -> tuple[dict, ...]:
    """The YAML documents of `text`, each checked against its kind's schema; PackagerError naming the field."""
    try:
        documents = tuple(document for document in yaml.safe_load_all(text) if document is not None)
    except yaml.YAMLError as exc:
        raise PackagerError(f"{where} renders invalid YAML: {' '.join(str(exc).split())}") from None
    for document in documents:
        if not isinstance(document, dict):
            raise PackagerError(f"{where} renders a document that is not an object: {document!r}")
        key = (document.get("apiVersion"), document.get("kind"))
        what = f"{where}: {key[1]}"
        if key == INFERENCE_SERVICE:
            _check_inference_service(document, what)
        elif key in KUBERNETES_MODELS:
            _check_model(KUBERNETES_MODELS[key], document, what)
        else:
            raise PackagerError(f"{where} renders apiVersion {key[0]!r} kind {key[1]!r}, which is not checked here")
        _check_quantities(document, what, "")
    return documents


def _check_model(model: type[pydantic.BaseModel], data: dict, what: str, at: str = "") -> None:
    """`data` as the client's `model`, strictly: as Kubernetes spells every field, and nothing else."""
    try:
        parsed = model.model_validate(data, strict=True)
    except pydantic.ValidationError as exc:
        error = exc.errors()[0]
        raise PackagerError(f"{what} {_join(at, _path(error['loc']))}: {error['msg']} ({model.__name__})") from None
    # The client's models also take Python names (container_port); the API server takes only the JSON ones.
    difference = _difference(data, parsed.model_dump(by_alias=True, exclude_none=True), "")
    if difference is not None:
        raise PackagerError(f"{what} {_join(at, difference)}: not a field as Kubernetes spells it "
                            f"({model.__name__})")


def _check_inference_service(data: dict, what: str) -> None:
    """KServe's InferenceService: its fields here, its metadata, pod and container parts with the client's models."""
    _only(data, {"apiVersion", "kind", "metadata", "spec"}, what, "")
    _check_model(k8s.V1ObjectMeta, data.get("metadata"), what, "metadata")
    spec = _table(data.get("spec"), what, "spec")
    _only(spec, {"predictor"}, what, "spec")
    predictor = _table(spec.get("predictor"), what, "spec.predictor")
    at = "spec.predictor"
    _kserve_fields(predictor, KSERVE_PREDICTOR_FIELDS, what, at)
    low, high = predictor.get("minReplicas", 1), predictor.get("maxReplicas", 1)
    if not 0 <= low <= high:
        raise PackagerError(f"{what} {at}: must satisfy 0 <= minReplicas <= maxReplicas; got {low}, {high}")
    pod = {key: value for key, value in predictor.items() if key not in KSERVE_PREDICTOR_FIELDS}
    _check_model(k8s.V1PodSpec, {**pod, "containers": []}, what, at)
    model = _table(predictor.get("model"), what, f"{at}.model")
    at = f"{at}.model"
    _kserve_fields(model, KSERVE_MODEL_FIELDS, what, at)
    container = {key: value for key, value in model.items() if key not in KSERVE_MODEL_FIELDS}
    _check_model(k8s.V1Container, {"name": KSERVE_CONTAINER, **container}, what, at)
    model_format = _table(model.get("modelFormat"), what, f"{at}.modelFormat")
    _only(model_format, {"name", "version"}, what, f"{at}.modelFormat")
    if model_format.get("name") != "triton":
        raise PackagerError(f"{what} {at}.modelFormat.name: must be \"triton\"; got {model_format.get('name')!r}")
    if not str(model.get("storageUri", "")).startswith("s3://"):
        raise PackagerError(f"{what} {at}.storageUri: must be an s3:// URI; got {model.get('storageUri')!r}")


def _kserve_fields(table: dict, fields: dict[str, type], what: str, at: str) -> None:
    for key, kind in fields.items():
        value = table.get(key)
        if value is not None and (type(value) is not kind):
            raise PackagerError(f"{what} {at}.{key}: must be {kind.__name__}; got {value!r}")


def _only(table: dict, keys: set[str], what: str, at: str) -> None:
    unknown = sorted(set(table) - keys)
    if unknown:
        raise PackagerError(f"{what} {_join(at, unknown[0])}: not a field here (known: {', '.join(sorted(keys))})")


def _table(value, what: str, at: str) -> dict:
    if not isinstance(value, dict):
        raise PackagerError(f"{what} {at}: must be an object; got {value!r}")
    return value


def _check_quantities(value, what: str, at: str) -> None:
    """Every value of requests, limits and sizeLimit parses as a Kubernetes quantity (the client's parser)."""
    if isinstance(value, list):
        for index, item in enumerate(value):
            _check_quantities(item, what, f"{at}[{index}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            here = _join(at, key)
            if key in QUANTITY_KEYS:
                quantities = {_join(here, name): q for name, q in item.items()} if isinstance(item, dict) \
                    else {here: item}
                for where, quantity in quantities.items():
                    try:
                        parse_quantity(quantity)
                    except ValueError:
                        raise PackagerError(f"{what} {where}: {quantity!r} is not a Kubernetes quantity") from None
            else:
                _check_quantities(item, what, here)


def _difference(given, parsed, at: str) -> str | None:
    """The path of the first key of `given` that `parsed` (the model's JSON form) spells otherwise or lacks."""
    if isinstance(given, dict) and isinstance(parsed, dict):
        for key, value in given.items():
            if key not in parsed:
                return _join(at, key)
            found = _difference(value, parsed[key], _join(at, key))
            if found is not None:
                return found
    elif isinstance(given, list) and isinstance(parsed, list):
        for index, (value, other) in enumerate(zip(given, parsed)):
            found = _difference(value, other, f"{at}[{index}]")
            if found is not None:
                return found
    return None


def _path(location: tuple) -> str:
    text = ""
    for part in location:
        text = f"{text}[{part}]" if isinstance(part, int) else _join(text, str(part))
    return text


def _join(at: str, key: str) -> str:
    return f"{at}.{key}" if at else key
