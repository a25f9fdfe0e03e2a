"""The attack: read a Job's spec (``kubectl get job -o yaml``, the audit log, a process
listing on the node) and find a credential or a presigned source URL in it.

Every Job the manager builds (publish for each source kind, the SharedPVC
materializer, the ``source.pvc`` reader) must carry its secrets as files of
one mounted Secret: nothing secret in ``command``, ``args`` or
``env[].value``, no ``secretKeyRef``; the worker finds them through
``VAR_FILE`` paths (``jobs/secretfiles.py``).
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from typing import Any

import pytest

from controller.delivery import materializer
from controller.models import publishjob as jobs
from controller.models import pvcsource
from jobs import report_client, secretfiles

PRESIGNED = ("https://user:pa55word@bucket.example.com/llama.gguf"
             "?X-Amz-Signature=deadbeefsig&X-Amz-Credential=AKIAEXAMPLE")
SETTINGS = jobs.Settings(namespace="modelcache-system", registry="dmcr:5000",
                         registry_secret="dmcr-push", report_url="http://mgr:8080",
                         report_key=b"report-key-bytes",
                         credentials_url="https://modelcache-controller:5050")
SOURCES: dict[str, dict[str, Any]] = {
    "http": {"url": PRESIGNED, "authSecretRef": {"name": "web"}},
    "huggingFace": {"repo": "acme/llama", "authSecretRef": {"name": "hf"}},
    "s3": {"bucket": "b", "prefix": "p/", "authSecretRef": {"name": "aws"}},
    "ollama": {"model": "library/llama"},
}
SECRETS = ("pa55word", "deadbeefsig", "AKIAEXAMPLE", "X-Amz", "user:")


def _model(source: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "modelcache.io/v1alpha1", "kind": "Model",
            "metadata": {"name": "m", "namespace": "team-a", "uid": "u-1", "generation": 1},
            "spec": {"source": source}}


def _leaks(job: dict[str, Any], secrets: tuple[str, ...]) -> list[str]:
    """What of ``secrets`` the Job's command line and env values show, and any secretKeyRef."""
    (box,) = job["spec"]["template"]["spec"]["containers"]
    shown = [*box.get("command", []), *box.get("args", [])]
    out = []
    for e in box.get("env") or []:
        if "valueFrom" in e:
            out.append(f"env {e['name']} from {e['valueFrom']}")
        shown.append(str(e.get("value", "")))
    out += [f"{s!r} in {v!r}" for v in shown for s in secrets if s in v]
    return out


def _secret_volume(job: dict[str, Any]) -> dict[str, Any]:
    pod = job["spec"]["template"]["spec"]
    (vol,) = [v for v in pod["volumes"] if "secret" in v]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == vol["name"]]
    assert mount["readOnly"] is True
    assert vol["secret"]["defaultMode"] == 0o440
    assert pod["securityContext"]["fsGroup"] == 65532  # the worker's group may read, no other
    return vol


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_publish_job_shows_no_secret(kind: str) -> None:
    obj = _model({kind: SOURCES[kind]})
    p = jobs.plan(obj, SETTINGS)
    job = jobs.build(obj, p, "k1", SETTINGS)
    token = jobs.report_token(SETTINGS, job["metadata"]["name"])
    assert _leaks(job, (*SECRETS, token)) == []
    vol = _secret_volume(job)
    assert vol["secret"]["secretName"] == jobs.copied_secret_name(job["metadata"]["name"])


def test_publish_job_secret_holds_what_the_worker_reads() -> None:
    obj = _model({"http": SOURCES["http"]})
    p = jobs.plan(obj, SETTINGS)
    job = jobs.build(obj, p, "k1", SETTINGS)
    name = job["metadata"]["name"]
    b64 = {k: base64.b64encode(v.encode()).decode() for k, v in
           {"username": "pusher", "password": "push-pw"}.items()}
    body = jobs.job_secret(obj, name, p, SETTINGS,
                           {"username": b64["username"], "password": b64["password"]})
    data = {k: base64.b64decode(v).decode() for k, v in body["data"].items()}
    # the tenant's source credential is not copied: only the controller's own material
    assert data == {"source": PRESIGNED,
                    "MODELCACHE_REGISTRY_USERNAME": "pusher",
                    "MODELCACHE_REGISTRY_PASSWORD": "push-pw",
                    "MODELCACHE_REPORT_TOKEN": jobs.report_token(SETTINGS, name)}
    env = {e["name"]: e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    # every VAR_FILE names a key of that Secret, under its mount
    for var in ("MODELCACHE_REGISTRY_USERNAME", "MODELCACHE_REGISTRY_PASSWORD",
                "MODELCACHE_REPORT_TOKEN"):
        assert env[f"{var}_FILE"] == f"/var/run/modelcache/secrets/{var}"
    assert "MODELCACHE_HTTP_TOKEN_FILE" not in env
    # the worker borrows it from the manager, which reads the Job's annotation
    assert env["MODELCACHE_CREDENTIALS_URL"] == \
        f"https://modelcache-controller:5050/credentials/{name}"
    use = jobs.lent(job)
    assert use == jobs.SecretUse("team-a", "web", {"MODELCACHE_HTTP_TOKEN": "token"})
    cmd = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[cmd.index("--source-file") + 1] == "/var/run/modelcache/secrets/source"


def test_no_credential_endpoint_refuses_a_model_with_a_secret() -> None:
    obj = _model({"http": SOURCES["http"]})
    bare = jobs.Settings(namespace="modelcache-system", registry="dmcr:5000")
    with pytest.raises(jobs.PermanentError) as e:
        jobs.build(obj, jobs.plan(obj, bare), "k1", bare)
    assert e.value.reason == "CredentialEndpointMissing"


def test_catalog_import_job_shows_no_token() -> None:
    obj = {"apiVersion": "modelcache.io/v1alpha1", "kind": "ClusterModel",
           "metadata": {"name": "m", "uid": "u-2", "generation": 1},
           "spec": {"source": {"catalog": {"sourceRef": "c", "model": "team/llama"}}},
           "status": {"catalog": {"digest": "sha256:" + "a" * 64}}}
    src = {"spec": {"url": "https://cat.example.com/?sig=deadbeefsig",
                    "tokenSecretRef": {"name": "cat-token"}}}
    p = jobs.plan(obj, SETTINGS, src)
    job = jobs.build(obj, p, "k2", SETTINGS)
    assert _leaks(job, SECRETS) == []
    env = {e["name"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "MODELCACHE_CATALOG_TOKEN" not in env and "MODELCACHE_CATALOG_TOKEN_FILE" not in env
    assert "MODELCACHE_CREDENTIALS_URL" in env
    use = jobs.lent(job)
    assert use is not None and use.keys == {"MODELCACHE_CATALOG_TOKEN": "token"}


def test_materializer_job_shows_no_pull_credential() -> None:
    pvc = {"metadata": {"name": "shared", "namespace": "team-a", "uid": "p-1"}}
    job = materializer.build_job(pvc, "sha256:" + "b" * 64, "dmcr:5000/models/team-a/m@x",
                                 SETTINGS, True)
    assert _leaks(job, SECRETS) == []
    assert _secret_volume(job)["secret"]["secretName"] == materializer.pull_secret_name("shared")


def test_pvc_reader_job_shows_no_token() -> None:
    obj = _model({"pvc": {"claimName": "w", "path": "x/"}})
    job = pvcsource.build_job(obj, "abc", "http://gw/v1/uploads/s1", SETTINGS)
    token = jobs.report_token(SETTINGS, job["metadata"]["name"])
    assert _leaks(job, (token,)) == []
    env = {e["name"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert {"MODELCACHE_UPLOAD_TOKEN_FILE", "MODELCACHE_REPORT_TOKEN_FILE"} <= env
    _secret_volume(job)


def test_worker_reads_credentials_from_files(tmp_path: Any, monkeypatch: Any) -> None:
    (tmp_path / "tok").write_text("hf_secret\n")
    (tmp_path / "rep").write_text("report-bearer")
    for var in ("HF_TOKEN", "MODELCACHE_REPORT_TOKEN", "AWS_SESSION_TOKEN", "PATH_X"):
        monkeypatch.delenv(var, raising=False)
    env = {"HF_TOKEN_FILE": str(tmp_path / "tok"),
           "MODELCACHE_REPORT_TOKEN_FILE": str(tmp_path / "rep"),
           "AWS_SESSION_TOKEN_FILE": str(tmp_path / "absent"),  # an optional key not there
           "PATH_X_FILE": str(tmp_path / "tok")}  # not a credential: never loaded
    secretfiles.load(env)
    assert env["HF_TOKEN"] == "hf_secret" and env["MODELCACHE_REPORT_TOKEN"] == "report-bearer"
    assert "AWS_SESSION_TOKEN" not in env and "PATH_X" not in env
    monkeypatch.setenv("MODELCACHE_REPORT_URL", "http://127.0.0.1:9/report/j")
    monkeypatch.setenv("MODELCACHE_REPORT_TOKEN_FILE", str(tmp_path / "rep"))
    reporter = report_client.sink_from_env()
    assert reporter is not None and reporter.token == "report-bearer"
    reporter.close()


def test_publish_worker_takes_its_source_from_a_file(tmp_path: Any) -> None:
    # the source file names a missing directory: the worker read it (the path is in the
    # error) though argv never held it
    (tmp_path / "src").write_text(str(tmp_path / "no-such-model") + "\n")
    p = subprocess.run([sys.executable, "-m", "controller.main", "publish",
                        "--source-file", str(tmp_path / "src"), "--to", "127.0.0.1:9/m:v1",
                        "--insecure-registry", "--work-dir", str(tmp_path / "w")],
                       capture_output=True, text=True, timeout=60, cwd=os.getcwd(),
                       env={**os.environ, "MODELCACHE_ALLOW_PRIVATE_SOURCES": "1"})
    assert p.returncode != 0
    assert "no-such-model" in p.stdout, (p.stdout, p.stderr)
