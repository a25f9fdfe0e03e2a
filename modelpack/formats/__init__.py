"""Model formats: verify a directory of model files and describe it.

``inspect_dir`` is the one entry point: it walks the directory safely,
classifies every file (weight, config, doc, code), verifies every weight
file by its own rules (safetensors, GGUF, diffusers layout), refuses
pickle unless allowed, and returns a ``ModelInfo`` whose parameter count
is summed from tensor shapes. A declared ``Raw`` model (``formats.raw``) is
walked and classified the same way but none of its files is parsed.
"""

from __future__ import annotations

import fnmatch
import os
from collections import Counter
from dataclasses import asdict, dataclass, field

from modelpack.errors import FormatError, PickleRefusedError
from modelpack.formats import diffusers, gguf, hfconfig, raw, safetensors
from modelpack.paths import LocalFile, walk_model_dir

FORMATS = ("Safetensors", "GGUF", "Diffusers", "Pickle", raw.NAME)
# what an owner may declare: Auto detects one of the first four, never Raw
EXPECTABLE = ("Auto", "Safetensors", "GGUF", "Diffusers", raw.NAME)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
WEIGHT_SUFFIXES = (".safetensors", ".gguf")
CODE_SUFFIXES = (".py", ".ipynb", ".sh")
DOC_GLOBS = ("readme*", "license*", "licence*", "notice*", "*.md", "*.pdf", "*.rst",
             ".gitattributes", "use_policy*")
DATASET_GLOBS = ("*.parquet", "*.arrow", "*.csv", "*.jsonl")


@dataclass(frozen=True)
class ModelFile:
    path: str
    abspath: str
    size: int
    kind: str  # weight | weight.config | doc | code | dataset


@dataclass(frozen=True)
class ModelInfo:
    format: str
    family: str | None = None
    architecture: str | None = None
    parameter_count: int = 0
    precision: str | None = None
    quantization: str | None = None
    context_length: int | None = None
    tensors: int = 0
    files: tuple[ModelFile, ...] = field(default_factory=tuple)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def summary(self) -> dict[str, object]:
        """The metadata without the local paths (what status and the config carry)."""
        d = asdict(self)
        d["files"] = len(self.files)
        d["sizeBytes"] = self.size
        return d


def classify(path: str, allow_pickle: bool = False) -> str:
    name = path.rsplit("/", 1)[-1].lower()
    if name.endswith(WEIGHT_SUFFIXES):
        return "weight"
    if name.endswith(PICKLE_SUFFIXES):
        if not allow_pickle:
            raise PickleRefusedError(
                f"{path!r} is a pickle file, which runs code when loaded; "
                "refused (allow pickle explicitly to package it)")
        return "weight"
    if name.endswith(CODE_SUFFIXES):
        return "code"
    if any(fnmatch.fnmatch(name, g) for g in DOC_GLOBS):
        return "doc"
    if any(fnmatch.fnmatch(name, g) for g in DATASET_GLOBS):
        return "dataset"
    return "weight.config"


def _precision(counts: Counter[str]) -> str | None:
    return counts.most_common(1)[0][0].lower() if counts else None


def inspect_files(root: str, local: list[LocalFile], expected: str = "Auto",
                  allow_pickle: bool = False) -> ModelInfo:
    """Verify and describe the given files of a model rooted at ``root``."""
    if not local:
        raise FormatError("the model has no files", reason="EmptyModel")
    if expected == raw.NAME:  # declared, never detected: described, not parsed
        return ModelInfo(format=raw.NAME, files=tuple(
            ModelFile(f.path, f.abspath, f.size, raw.kind(classify(f.path, allow_pickle)))
            for f in local))
    files = tuple(ModelFile(f.path, f.abspath, f.size, classify(f.path, allow_pickle))
                  for f in local)
    present = {f.path for f in files}
    weights = [f for f in files if f.kind == "weight"]
    st = [f for f in weights if f.path.endswith(".safetensors")]
    gg = [f for f in weights if f.path.endswith(".gguf")]
    pk = [f for f in weights if f.path.lower().endswith(PICKLE_SUFFIXES)]
    if diffusers.INDEX in present:
        fmt = "Diffusers"
    elif gg and not st:
        fmt = "GGUF"
    elif st:
        fmt = "Safetensors"
    elif pk:
        fmt = "Pickle"
    else:
        raise FormatError("no weight files (.safetensors, .gguf) found; a runtime's own "
                          "files are delivered unparsed only with format Raw declared",
                          reason="NoWeights")
    if expected not in ("Auto", "", None) and expected != fmt:
        raise FormatError(f"expected format {expected}, found {fmt}", reason="FormatMismatch")

    params = tensors = 0
    dtypes: Counter[str] = Counter()
    family = arch = quant = None
    ctx: int | None = None
    for f in st:
        info = safetensors.verify(f.abspath)
        params += info.parameters
        tensors += info.tensors
        dtypes.update(info.dtypes)
    for f in gg:
        g = gguf.verify(f.abspath)
        params += g.parameters
        tensors += g.tensors
        dtypes.update(g.tensor_types)
        family = family or g.architecture
        arch = arch or g.architecture
        quant = quant or g.file_type
        ctx = ctx or g.context_length
    for f in files:
        if f.path.endswith(".safetensors.index.json"):
            _check_shard_index(root, f, present)
    if fmt == "Diffusers":
        d = diffusers.verify(root, present)
        family, arch = d.pipeline, d.pipeline
    cfg_path = os.path.join(root, "config.json")
    if "config.json" in present:
        cfg = hfconfig.read(cfg_path)
        family = cfg.family or family
        arch = cfg.architecture or arch
        ctx = cfg.context_length or ctx
    return ModelInfo(
        format=fmt, family=family, architecture=arch, parameter_count=params,
        precision=_precision(dtypes), quantization=quant, context_length=ctx,
        tensors=tensors, files=files,
    )


def _check_shard_index(root: str, f: ModelFile, present: set[str]) -> None:
    index = hfconfig.load_json(f.abspath)
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict):
        raise FormatError(f"{f.path} has no weight_map", reason="InvalidShardIndex")
    base = f.path.rsplit("/", 1)[0] + "/" if "/" in f.path else ""
    for shard in wm.values():  # not set(): a hostile value may be an unhashable list
        if not isinstance(shard, str) or base + shard not in present:
            raise FormatError(f"{f.path} names shard {str(shard)[:80]!r}, which is missing",
                              reason="MissingShard")


def inspect_dir(root: str, expected: str = "Auto", allow_pickle: bool = False) -> ModelInfo:
    """Walk ``root`` safely, verify every weight file, and describe the model."""
    return inspect_files(root, walk_model_dir(root), expected, allow_pickle)
