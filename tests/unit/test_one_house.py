"""One definition each: the toolkit, the contract and the views are not written twice.

The control-plane renovation (issue 12) left one home for each shared
concept. These checks read the source tree (not tests/, bench/) and fail
when a second copy appears: a name of the contract spelled outside
api/names.py, a second informer, log setup or certificate builder, the Job
result protocol's exit codes written outside api/jobresult.py, a Model's
status walked by hand instead of through api/model.ModelView, or the
resolved-metadata field list written out again.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("modelpack", "api", "kube", "ingest", "jobs", "csi", "controller", "cli")


def _modules() -> dict[str, ast.Module]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            if "gen" in p.relative_to(ROOT).parts:
                continue
            out[str(p.relative_to(ROOT))] = ast.parse(p.read_text(), str(p))
    return out


MODULES = _modules()


def _where(pred) -> list[str]:
    hits = []
    for rel, tree in MODULES.items():
        for node in ast.walk(tree):
            if pred(rel, node):
                hits.append(f"{rel}:{getattr(node, 'lineno', 0)}")
    return hits


def _str(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def test_contract_names_are_defined_only_in_api_names():
    def pred(rel, node):
        if rel == "api/names.py" or not isinstance(node, ast.Assign):
            return False
        value = _str(node.value)
        return value is not None and (value.startswith("modelcache.io/")
                                      or value.startswith("nodecache.modelcache.io"))
    assert _where(pred) == []


def _defines(name: str):
    def pred(rel, node):
        return isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name == name
    return pred


def test_one_informer_one_log_setup_one_certificate_builder():
    informers = _where(lambda rel, n: isinstance(n, ast.ClassDef) and "Informer" in n.name)
    assert [h.split(":")[0] for h in informers] == ["kube/informer.py"]
    formatters = _where(lambda rel, n: isinstance(n, ast.ClassDef) and any(
        isinstance(b, ast.Attribute) and b.attr == "Formatter" for b in n.bases))
    assert {h.split(":")[0] for h in formatters} <= {"kube/logs.py"}
    basic = _where(lambda rel, n: isinstance(n, ast.Attribute) and n.attr == "basicConfig")
    assert {h.split(":")[0] for h in basic} <= {"kube/logs.py"}
    builders = _where(lambda rel, n: isinstance(n, ast.Attribute) and n.attr == "CertificateBuilder")
    assert {h.split(":")[0] for h in builders} == {"kube/certs.py"}


def test_helpers_are_defined_once():
    for name in ("size_arg", "node_label", "run_all", "now"):
        hits = _where(_defines(name))
        assert len(hits) == 1, (name, hits)


def test_job_result_protocol_is_written_once():
    # the retryable exit code (EX_TEMPFAIL, 75) and the termination message
    # path appear only in the protocol's module
    def pred(rel, node):
        if rel == "api/jobresult.py":
            return False
        if isinstance(node, ast.Constant) and node.value == 75 and not isinstance(node.value, bool):
            return True
        return _str(node) == "/dev/termination-log"
    assert _where(pred) == []


def test_model_status_is_read_through_the_view():
    # a raw walk into status.artifact / status.resolved / status.phase outside the
    # view (a Job's result document has "resolved" too: only walks through a
    # "status" count)
    def pred(rel, node):
        if rel == "api/model.py" or rel.startswith("modelpack/"):
            return False
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr == "get" and node.args:
            key, receiver = _str(node.args[0]), node.func.value
        elif isinstance(node, ast.Subscript):
            key, receiver = _str(node.slice), node.value
        else:
            return False
        return key in ("artifact", "resolved") and "status" in ast.unparse(receiver)
    assert _where(pred) == []


def test_resolved_field_list_is_written_once():
    def pred(rel, node):
        if rel == "api/model.py" or rel.startswith("modelpack/"):
            return False
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            return sum(_str(e) in ("parameterCount", "contextLength", "quantization")
                       for e in node.elts) >= 2
        return False
    assert _where(pred) == []
