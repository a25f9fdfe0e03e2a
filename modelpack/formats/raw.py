"""The Raw format: files delivered exactly as they are, by the owner's declaration.

Where it sits: ``formats.inspect_files`` takes this branch only when the
expected format is ``Raw`` (``spec.format: Raw``, ``--format Raw``); Auto
never picks it, so a tree that merely lacks safetensors or GGUF still fails
with ``NoWeights`` instead of slipping through unparsed. It exists for
runtimes with their own files: distributed-llama's ``.m``/``.t``, a Triton
model repository (``config.pbtxt``, ``1/model.onnx``), TorchServe's ``.mar``.

Declared Raw, no file's contents are parsed (no header, no tensor count, no
family). Everything else stays as for any format, because it happens before
this point or after it: each path is checked by ``modelpack.paths`` and each
archive by ``ingest.sources.archive`` (traversal, links, sizes, counts), each
file is hashed while staged and its digest is what the registry, the node
cache and the pull verify, and pickle suffixes are refused unless allowed.
"""

from __future__ import annotations

NAME = "Raw"


def kind(classified: str) -> str:
    """The layer kind of a file in a Raw model.

    Outside Raw, a file that is not a weight, doc, code or dataset is weight
    configuration; in Raw the runtime's own files (``.m``, ``.plan``, ``.mar``)
    are its weights, so they are published with the weight media type.
    """
    return "weight" if classified == "weight.config" else classified
