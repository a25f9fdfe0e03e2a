"""What Triton and TorchServe load, checked on a delivered tree (tests only).

Where it sits: the example tests publish each example's model (generated,
tiny, by the ``make_*`` helpers here), pull the artifact back as a node
would, and hold the tree against the server's documented rules below. The
servers themselves are not run here (no GPU, no JVM); these rules are
restated from their documentation, each with its source, and
tests/integration/test_example_layouts.py shows each rule refusing a tree
that breaks it.

Triton (server docs, user_guide/model_repository.md and model_configuration.md)::

    <model-repository>/<model-name>/config.pbtxt      name, if set, == <model-name>
    <model-repository>/<model-name>/<version>/<file>  version: digits, no leading 0
                                                      (other subdirectories ignored);
                                                      at least one version
    <file>: default_model_filename if set, else the backend's default name:
    model.plan (tensorrt), model.onnx (onnxruntime), model.pt (pytorch),
    model.graphdef / model.savedmodel (tensorflow), model.xml + model.bin
    (openvino), model.py (python), model.dali (dali), model.json (vllm)

TorchServe (model-archiver/README.md, docs/server.md)::

    --model-store DIR, --models=all: every <name>.mar file in DIR
    <name>.mar: a zip; MAR-INF/MANIFEST.json = {"runtime": "python",
        "model": {"modelName": <name>, "modelVersion", "handler",
                  ["serializedFile", "modelFile", "requirementsFile"]}, "archiverVersion"}
    handler: a default handler's name or a file in the archive (file.py[:function]);
    serializedFile / modelFile / requirementsFile, when set, are in the archive
"""

from __future__ import annotations

import json
import os
import re
import zipfile

# platform or backend -> the file a version directory must hold (model_repository.md)
TRITON_DEFAULT_FILES = {
    "tensorrt_plan": ("model.plan",), "tensorrt": ("model.plan",),
    "onnxruntime_onnx": ("model.onnx",), "onnxruntime": ("model.onnx",),
    "pytorch_libtorch": ("model.pt",), "pytorch": ("model.pt",),
    "tensorflow_graphdef": ("model.graphdef",),
    "tensorflow_savedmodel": ("model.savedmodel",),
    "openvino": ("model.xml", "model.bin"),
    "python": ("model.py",), "dali": ("model.dali",), "vllm": ("model.json",),
}
TRITON_VERSION = re.compile(r"[1-9][0-9]*")
_PBTXT_FIELD = re.compile(r'^\s*(name|platform|backend|default_model_filename)\s*:\s*"([^"]*)"',
                          re.MULTILINE)

TORCHSERVE_HANDLERS = ("image_classifier", "image_segmenter", "object_detector",
                       "text_classifier")  # the default handlers (docs/default_handlers.md)
TORCHSERVE_MANIFEST = "MAR-INF/MANIFEST.json"
TORCHSERVE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


class LayoutError(AssertionError):
    """The tree is not one the server loads; the message says which rule it breaks."""


def _pbtxt_fields(path: str) -> dict[str, str]:
    """The top-level string fields the layout depends on (not a protobuf text parser:
    the examples' configs keep these fields on their own lines)."""
    with open(path) as f:
        text, prev = f.read(), ""
    while prev != text:  # blocks removed, innermost first: only top-level fields remain
        prev, text = text, re.sub(r"\{[^{}]*\}", "", text)
    return dict(_PBTXT_FIELD.findall(text))


def check_triton_model(repository: str, name: str) -> list[str]:
    """Check ``repository/name`` as Triton loads it; return the versions it would serve."""
    model = os.path.join(repository, name)
    config = os.path.join(model, "config.pbtxt")
    if not os.path.isfile(config):
        raise LayoutError(f"{name}: no config.pbtxt")
    fields = _pbtxt_fields(config)
    if fields.get("name", name) != name:
        raise LayoutError(f"{name}: config.pbtxt names {fields['name']!r}, "
                          "not its directory")
    kind = fields.get("backend") or fields.get("platform")
    if not kind:
        raise LayoutError(f"{name}: config.pbtxt sets neither platform nor backend")
    wanted = ((fields["default_model_filename"],) if "default_model_filename" in fields
              else TRITON_DEFAULT_FILES.get(kind))
    if wanted is None:
        raise LayoutError(f"{name}: unknown platform/backend {kind!r}")
    versions = sorted(d for d in os.listdir(model)
                      if os.path.isdir(os.path.join(model, d)) and TRITON_VERSION.fullmatch(d))
    if not versions:
        raise LayoutError(f"{name}: no numeric version directory")
    for v in versions:
        for file in wanted:
            if not os.path.exists(os.path.join(model, v, file)):
                raise LayoutError(f"{name}/{v}: no {file} for {kind}")
    return versions


def check_torchserve_store(store: str) -> list[str]:
    """Check a model store as ``--models=all`` loads it; return the model names."""
    mars = sorted(n for n in os.listdir(store)
                  if n.endswith(".mar") and os.path.isfile(os.path.join(store, n)))
    if not mars:
        raise LayoutError("no .mar archive in the model store")
    return [_check_mar(os.path.join(store, n)) for n in mars]


def _check_mar(path: str) -> str:
    stem = os.path.basename(path)[:-len(".mar")]
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if TORCHSERVE_MANIFEST not in names:
                raise LayoutError(f"{stem}.mar: no {TORCHSERVE_MANIFEST}")
            manifest = json.loads(zf.read(TORCHSERVE_MANIFEST))
    except zipfile.BadZipFile as e:
        raise LayoutError(f"{stem}.mar: not a zip ({e})") from None
    if any(n.startswith("/") or ".." in n.split("/") for n in names):
        raise LayoutError(f"{stem}.mar: an entry climbs out of the archive")
    model = manifest.get("model") if isinstance(manifest, dict) else None
    if not isinstance(model, dict) or manifest.get("runtime") != "python":
        raise LayoutError(f"{stem}.mar: the manifest lacks runtime python or model")
    for key in ("modelName", "modelVersion", "handler"):
        if not isinstance(model.get(key), str) or not model[key]:
            raise LayoutError(f"{stem}.mar: model.{key} is not set")
    if not TORCHSERVE_NAME.fullmatch(model["modelName"]) or model["modelName"] != stem:
        raise LayoutError(f"{stem}.mar: modelName {model['modelName']!r} is not the file's")
    handler = model["handler"].split(":", 1)[0]
    if handler not in TORCHSERVE_HANDLERS and handler not in names \
            and f"{handler}.py" not in names:
        raise LayoutError(f"{stem}.mar: handler {handler!r} is neither a default handler "
                          "nor a file in the archive")
    for key in ("serializedFile", "modelFile", "requirementsFile"):
        if model.get(key) and model[key] not in names:
            raise LayoutError(f"{stem}.mar: model.{key} {model[key]!r} is not in the archive")
    return str(model["modelName"])


# --- tiny trees of the examples' shapes (bytes, not working models) ---

def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def make_triton_model(root: str, name: str) -> None:
    """``root`` becomes Triton model directory ``name``: config.pbtxt and 1/model.onnx."""
    _write(os.path.join(root, "config.pbtxt"), f'''name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ {{ name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] }} ]
output [ {{ name: "embeddings" data_type: TYPE_FP32 dims: [ 384 ] }} ]
'''.encode())
    _write(os.path.join(root, "1", "model.onnx"), os.urandom(4096))


def make_mar(path: str, name: str, manifest: dict[str, object] | None = None) -> None:
    """A .mar as torch-model-archiver writes it, with a TorchScript file and a default
    handler; ``manifest`` replaces the generated MANIFEST.json."""
    default = {"createdOn": "05/12/2026 05:00:00", "runtime": "python",
               "model": {"modelName": name, "serializedFile": "model.pt",
                         "handler": "image_classifier", "modelVersion": "1.0"},
               "archiverVersion": "0.12.0"}
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(TORCHSERVE_MANIFEST, json.dumps(manifest or default))
        zf.writestr("model.pt", os.urandom(2048))
        zf.writestr("index_to_name.json", json.dumps({str(i): str(i) for i in range(10)}))


def make_dllama(root: str, model: str, tokenizer: str) -> None:
    """distributed-llama's converted model and tokenizer (opaque bytes of its suffixes)."""
    _write(os.path.join(root, model), os.urandom(64 * 1024))
    _write(os.path.join(root, tokenizer), os.urandom(4 * 1024))
