"""Kubernetes manifests (`packager manifests`): golden files, the schema check catching a broken template, and the
recipe's [deploy] section and the Triton release reaching probes, resources, image and server arguments.

Regenerate the golden files with `UPDATE_GOLDEN=1 pytest tests/test_manifests.py -k golden` and review the diff.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kubernetes import client as k8s

from packager import manifests, templating
from packager.cli import main
from packager.errors import PackagerError, UsageError
from packager.recipe import load_recipe

GOLDEN = Path(__file__).parent / "golden" / "k8s" / "bert"
REPOSITORY = "s3://models/fleet"


def render(overrides: dict | None = None, repository: str = REPOSITORY, endpoint_url: str | None = None) -> dict:
    """The rendered documents of bert (with `overrides` merged into its recipe) by kind."""
    recipe = load_recipe("bert", overrides=overrides)
    return {document["kind"]: document
            for manifest in manifests.render_manifests(recipe, repository, endpoint_url)
            for document in manifest.objects}


def server(documents: dict) -> k8s.V1Container:
    (container,) = k8s.V1Deployment.from_dict(documents["Deployment"]).spec.template.spec.containers
    return container


def kserve_model(documents: dict) -> dict:
    return documents["InferenceService"]["spec"]["predictor"]["model"]


# ---- golden files ------------------------------------------------------------------------------------------------


def test_rendered_manifests_match_the_golden_files():
    rendered = {m.file: m.text for m in manifests.render_manifests(load_recipe("bert"), REPOSITORY)}
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.mkdir(parents=True, exist_ok=True)
        for file, text in rendered.items():
            (GOLDEN / file).write_text(text)
    assert sorted(p.name for p in GOLDEN.glob("*.yaml")) == sorted(rendered) == ["fleet.yaml", "kserve.yaml"]
    for file, text in rendered.items():
        assert text == (GOLDEN / file).read_text(), f"{file} differs from its golden file"


def test_the_command_writes_the_checked_files_and_says_they_are_not_applied(tmp_path, capsys):
    assert main(["manifests", "bert", "--repository", REPOSITORY + "/", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fleet.yaml", "kserve.yaml"]  # no temporary file left
    for path in tmp_path.iterdir():
        assert path.read_text() == (GOLDEN / path.name).read_text()
    out = capsys.readouterr().out
    assert f"{tmp_path / 'fleet.yaml'}: Deployment bert-triton, Service bert-triton" in out
    assert f"{tmp_path / 'kserve.yaml'}: ServiceAccount bert, InferenceService bert" in out
    assert "not applied" in out


def test_the_command_imports_no_heavy_library(tmp_path):
    """Rendering manifests needs the recipe only: no torch, transformers, ONNX Runtime or TensorRT."""
    code = (f"import sys\nfrom packager.cli import main\n"
            f"assert main(['manifests', 'bert', '--repository', {REPOSITORY!r}, '--out', {str(tmp_path)!r}]) == 0\n"
            "print(sorted(m for m in ('torch', 'transformers', 'onnxruntime', 'tensorrt', 'tensorrt_rtx') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout + result.stderr


@pytest.mark.parametrize(("arguments", "message"), [
    (["--repository", "model_repository"], "a fleet reads object storage; give s3://bucket/prefix"),
    (["--repository", "s3://127.0.0.1:9000/models"], "an S3-compatible endpoint goes in --s3-endpoint"),
    (["--repository", REPOSITORY, "--s3-endpoint", "minio:9000"], "give http(s)://host[:port]"),
])
def test_bad_input_is_one_line_and_exit_2_and_writes_nothing(tmp_path, capsys, arguments, message):
    assert main(["manifests", "bert", *arguments, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# ---- the schema check --------------------------------------------------------------------------------------------


BREAKAGES = {  # template, a line of it, what replaces the line, what the error names
    "unknown container field": ("k8s/fleet.yaml.j2", '        - name: tritonserver\n',
                                '        - name: tritonserver\n          bogus: 1\n',
                                "Deployment spec.template.spec.containers[0].bogus: Extra inputs are not permitted"),
    "a port as a string": ("k8s/fleet.yaml.j2", '              containerPort: {{ port.number | yaml }}\n',
                           '              containerPort: "{{ port.number }}"\n',
                           "containers[0].ports[0].containerPort: Input should be a valid integer"),
    "a Python field name": ("k8s/fleet.yaml.j2", '  type: ClusterIP\n', '  session_affinity: "None"\n',
                            "Service spec.session_affinity: not a field as Kubernetes spells it"),
    "a bad quantity": ("k8s/fleet.yaml.j2", '            sizeLimit: {{ fleet.shm_quantity | yaml }}\n',
                       '            sizeLimit: "1GB"\n', "emptyDir.sizeLimit: '1GB' is not a Kubernetes quantity"),
    "unknown KServe model field": ("k8s/kserve.yaml.j2", '      storageUri: {{ fleet.storage_uri | yaml }}\n',
                                   '      storageURI: {{ fleet.storage_uri | yaml }}\n',
                                   "InferenceService spec.predictor.model.storageURI: Extra inputs are not permitted"),
    "unknown predictor field": ("k8s/kserve.yaml.j2", '    minReplicas: {{ deploy.replicas | yaml }}\n',
                                '    minReplica: {{ deploy.replicas | yaml }}\n',
                                "spec.predictor.minReplica: Extra inputs are not permitted (V1PodSpec)"),
    "unknown metadata field": ("k8s/kserve.yaml.j2", 'kind: InferenceService\nmetadata:\n',
                               'kind: InferenceService\nmetadata:\n  namespaces: "x"\n',
                               "InferenceService metadata.namespaces: Extra inputs are not permitted"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_a_broken_template_is_refused_naming_the_field(tmp_path, monkeypatch, breakage):
    template, line, replacement, expected = BREAKAGES[breakage]
    copy = tmp_path / "templates"
    shutil.copytree(templating.TEMPLATE_DIR, copy)
    text = (copy / template).read_text()
    assert text.count(line) == 1
    (copy / template).write_text(text.replace(line, replacement))
    monkeypatch.setattr(templating, "TEMPLATE_DIR", copy)
    with pytest.raises(PackagerError) as raised:
        render()
    assert expected in str(raised.value)
    assert str(raised.value).startswith(template)


def test_kserve_fields_the_client_does_not_model_are_checked_here():
    documents = render()
    service = documents["InferenceService"]
    for change, expected in [
        ({"modelFormat": {"name": "onnx"}}, 'modelFormat.name: must be "triton"'),
        ({"storageUri": "/models"}, "storageUri: must be an s3:// URI"),
        ({"runtimeVersion": 24.1}, "runtimeVersion: must be str"),
    ]:
        broken = {**service, "spec": {"predictor": {**service["spec"]["predictor"],
                                                    "model": {**kserve_model(documents), **change}}}}
        with pytest.raises(PackagerError, match=expected):
            manifests.check_documents(yaml.safe_dump(broken), "test")
    wrong = {**service, "spec": {"predictor": {**service["spec"]["predictor"], "minReplicas": 5, "maxReplicas": 4}}}
    with pytest.raises(PackagerError, match="0 <= minReplicas <= maxReplicas"):
        manifests.check_documents(yaml.safe_dump(wrong), "test")
    with pytest.raises(PackagerError, match="kind 'Ingress', which is not checked here"):
        manifests.check_documents("apiVersion: networking.k8s.io/v1\nkind: Ingress\n", "test")


def test_the_yaml_filter_keeps_any_string_one_value():
    nasty = "a: b # c\n- 'd' \"e\" {f} [g] \\ ünï"
    text = templating.environment().from_string("key: {{ value | yaml }}\nlist: {{ items | yaml }}\n").render(
        value=nasty, items=[nasty, 3])
    assert yaml.safe_load(text) == {"key": nasty, "list": [nasty, 3]}


# ---- recipe and release ------------------------------------------------------------------------------------------


def test_probes_ports_and_the_image_follow_the_release():
    documents = render({"tensorrt": {"triton_release": "25.03"}})
    container = server(documents)
    assert container.image == "nvcr.io/nvidia/tritonserver:25.03-py3"
    assert kserve_model(documents)["runtimeVersion"] == "25.03-py3"
    assert {p.name: p.container_port for p in container.ports} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert (container.readiness_probe.http_get.path, container.readiness_probe.http_get.port) == \
           ("/v2/health/ready", "http")
    assert (container.liveness_probe.http_get.path, container.liveness_probe.http_get.port) == \
           ("/v2/health/live", "http")
    model = k8s.V1Container.from_dict({"name": "kserve-container", **{
        key: value for key, value in kserve_model(documents).items() if key not in manifests.KSERVE_MODEL_FIELDS}})
    assert (model.readiness_probe.http_get.path, model.liveness_probe.http_get.path) == \
           ("/v2/health/ready", "/v2/health/live")
    assert model.readiness_probe.http_get.port == manifests.KSERVE_HTTP_PORT
    service = k8s.V1Service.from_dict(documents["Service"])
    assert service.spec.selector == documents["Deployment"]["spec"]["selector"]["matchLabels"]
    assert service.spec.selector.items() <= documents["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    kserve_labels = documents["InferenceService"]["metadata"]["labels"]
    assert not service.spec.selector.items() <= kserve_labels.items(), "the fleet Service would select KServe pods"


def test_poll_and_explicit_modes_and_the_repository_reach_the_server_arguments():
    poll = server(render({"deploy": {"poll_seconds": 30}})).args
    assert poll[:3] == ["--model-repository=s3://models/fleet", "--model-control-mode=poll",
                        "--repository-poll-secs=30"]
    explicit = server(render({"deploy": {"model_control": "explicit"}}, repository="s3://models/a/b/")).args
    assert explicit[:3] == ["--model-repository=s3://models/a/b", "--model-control-mode=explicit", "--load-model=*"]
    assert not [arg for arg in explicit if "poll" in arg]


def test_an_s3_compatible_endpoint_goes_into_triton_uri_and_the_environment_not_kserve_storage():
    documents = render(endpoint_url="http://minio.storage:9000/")
    container = server(documents)
    assert container.args[0] == "--model-repository=s3://http://minio.storage:9000/models/fleet"
    env = {e.name: e for e in container.env}
    assert env["AWS_ENDPOINT_URL"].value == "http://minio.storage:9000"
    assert kserve_model(documents)["storageUri"] == "s3://models/fleet"
    assert "AWS_ENDPOINT_URL" not in {e.name: e for e in server(render()).env}


def test_credentials_come_from_the_named_secret():
    documents = render({"deploy": {"credentials_secret": "fleet-s3"}})
    env = {e.name: e.value_from.secret_key_ref for e in server(documents).env}
    assert {name: (ref.name, ref.key, ref.optional) for name, ref in env.items()} == {
        "AWS_ACCESS_KEY_ID": ("fleet-s3", "AWS_ACCESS_KEY_ID", None),
        "AWS_SECRET_ACCESS_KEY": ("fleet-s3", "AWS_SECRET_ACCESS_KEY", None),
        "AWS_DEFAULT_REGION": ("fleet-s3", "AWS_DEFAULT_REGION", True),
    }
    assert documents["ServiceAccount"]["secrets"] == [{"name": "fleet-s3"}]
    assert documents["InferenceService"]["spec"]["predictor"]["serviceAccountName"] == "bert"


def test_resources_follow_the_recipe_and_gpus_map_to_nvidia_gpu():
    cpu = render({"deploy": {"cpu": 1.5, "memory_mib": 3072, "shm_mib": 512, "replicas": 3, "max_replicas": 6}})
    resources = server(cpu).resources
    assert resources.requests == resources.limits == {"cpu": "1500m", "memory": "3072Mi"}
    assert "--pinned-memory-pool-byte-size=0" in server(cpu).args
    assert cpu["Deployment"]["spec"]["replicas"] == 3
    predictor = cpu["InferenceService"]["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (3, 6)
    assert predictor["model"]["resources"]["limits"] == {"cpu": "1500m", "memory": "3072Mi"}
    assert cpu["Deployment"]["spec"]["template"]["spec"]["volumes"][0]["emptyDir"]["sizeLimit"] == "512Mi"

    gpu = render({"serving": {"device": "gpu"}, "deploy": {"gpus": 2}})
    resources = server(gpu).resources
    assert resources.requests == resources.limits == {"cpu": "2", "memory": "2048Mi", "nvidia.com/gpu": "2"}
    assert kserve_model(gpu)["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert not [arg for arg in server(gpu).args if "memory-pool" in arg], "CPU-only flags on a GPU server"


@pytest.mark.parametrize(("deploy", "message"), [
    ({"cpus": 2}, "[deploy]: unknown key 'cpus'; did you mean 'cpu'?"),
    ({"gpus": 17}, "gpus must be 0..16"),
    ({"cpu": 0.0004}, "cpu must be 0.001..512 cores"),
    ({"replicas": 5, "max_replicas": 4}, "1 <= replicas <= max_replicas"),
    ({"model_control": "none"}, "must be one of 'poll', 'explicit'"),
    ({"shm_mib": 4096}, "shm_mib must be at least 64 and below memory_mib"),
    ({"credentials_secret": "S3_Creds"}, "credentials_secret must be a Kubernetes name"),
])
def test_the_deploy_section_is_checked_with_the_recipe(deploy, message):
    with pytest.raises(UsageError) as raised:
        load_recipe("bert", overrides={"deploy": deploy})
    assert message in str(raised.value)


def test_a_gpu_device_needs_gpus_and_names_must_be_kubernetes_names():
    with pytest.raises(UsageError, match="device is \"gpu\" but \\[deploy\\] gpus is 0"):
        render({"serving": {"device": "gpu"}})
    with pytest.raises(UsageError, match="not a DNS label"):
        manifests.fleet_of(load_recipe("bert").replace(name="9bert"), REPOSITORY)
    assert manifests.fleet_of(load_recipe("bert").replace(name="mini_lm"), REPOSITORY).name == "mini-lm-triton"
