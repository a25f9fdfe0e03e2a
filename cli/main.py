"""``modelcache``: pack, pull and inspect ModelPacks from the command line.

Where it sits: the entry point. This module is the parser and the error
contract; each command's body lives with its feature (``pack.py``,
``pull.py`` for pull and inspect, ``upload.py``, ``bundle.py`` for export and
import, ``demo.py``), registry flags and credentials in ``access.py``.

Exit codes are one table (``cli.errors.EXIT_CODES``, shown by ``--help``): a
failure exits 1 with one line ``modelcache: REASON: message``; a usage error
(argparse's, or something a command needs that was neither given nor found)
exits 2; Ctrl-C 130. Registry credentials come from flags, the environment
(MODELCACHE_REGISTRY_USERNAME / MODELCACHE_REGISTRY_PASSWORD /
MODELCACHE_REGISTRY_TOKEN) or ~/.docker/config.json, never from a log.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import NoReturn

from api.jobresult import JobError
from cli import access, errors, pack, progress, pull, upload
from kube import client as kube
from kube import logs
from modelpack.errors import ModelPackError

DESCRIPTION = """\
modelcache moves AI model weights: it verifies a model (safetensors, GGUF,
diffusers; pickle refused), packages it as an OCI ModelPack (one layer per
file, no conversion), pushes it to a registry, and pulls it back verified.

examples:
  modelcache pack ./qwen --push 127.0.0.1:5000/models/qwen:v1 --insecure
  modelcache pack ./qwen --output ./qwen-oci
  modelcache pull 127.0.0.1:5000/models/qwen:v1 ./qwen-copy --insecure
  modelcache inspect ./qwen --json
  modelcache upload my-finetune ./checkpoint/ -n team-a
"""


def cmd_export(args: argparse.Namespace) -> int:
    # cli.bundle is imported when it runs, for start-up time: it brings kube, api and yaml
    # (~30 ms) that pack, pull and inspect do not need
    from cli import bundle

    return bundle.cmd_export(args)


def cmd_import(args: argparse.Namespace) -> int:
    from cli import bundle  # start-up time, as in cmd_export

    return bundle.cmd_import(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from cli import demo  # start-up time: see build_parser

    return demo.run_args(args)


def build_parser(with_demo: bool = True) -> argparse.ArgumentParser:
    """The whole command line; ``with_demo=False`` leaves out the demo's own flags.

    The demo's module brings in the local cluster, yaml and cryptography (tens of
    ms at every start); ``main`` builds them only when "demo" is on the command line.
    """
    p = argparse.ArgumentParser(prog="modelcache", description=DESCRIPTION,
                                epilog=errors.EXIT_CODES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens (to stderr)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pk = sub.add_parser("pack", help="verify a model and write a ModelPack",
                        description="Verify a model directory (or a remote source) and write "
                        "it as an OCI ModelPack to a registry (--push) or a layout (--output).")
    pk.add_argument("source", metavar="SOURCE", help="a model directory, or hf://ORG/REPO[@REV], "
                    "ollama://[HOST/]NS/MODEL[:TAG], http(s)://…, s3://BUCKET/PREFIX")
    dest = pk.add_mutually_exclusive_group(required=True)
    dest.add_argument("--push", metavar="REF", help="registry reference HOST/REPO[:TAG]")
    dest.add_argument("--output", metavar="OCI_DIR", help="write an OCI image layout directory")
    pk.add_argument("--tag", default="latest", help="tag inside the OCI layout (default: latest)")
    pk.add_argument("--format", default="Auto",
                    choices=["Auto", "Safetensors", "GGUF", "Diffusers", "Raw"],
                    help="the format you expect; anything else is refused")
    pk.add_argument("--allow-pickle", action="store_true",
                    help="package pickle weights (.bin/.pt/.pth/.ckpt); they run code on load")
    src = pk.add_argument_group("remote sources (credentials from HF_TOKEN, HF_ENDPOINT, AWS_*)")
    src.add_argument("--include", action="append", metavar="GLOB",
                     help="only files matching GLOB (repeatable; Hugging Face, S3)")
    src.add_argument("--exclude", action="append", metavar="GLOB",
                     help="skip files matching GLOB (repeatable)")
    src.add_argument("--sha256", help="expected sha256 of an http(s) download")
    access.add_flags(pk)
    pk.set_defaults(func=pack.cmd_pack)

    up = sub.add_parser("upload", help="upload local files to a Model with source.upload",
                        description="Upload a directory, a file or a tar/zip to a Model's "
                        "upload session. The session is read from the Model through the "
                        "kubeconfig (status.upload.url and the token Secret it names); "
                        "--url and --token-file give it by hand where you may not read them. "
                        "Resumes after a cut connection; waits until the model is verified "
                        "and published.")
    up.add_argument("model", metavar="MODEL", help="the Model (spec.source.upload)")
    up.add_argument("path", metavar="PATH", help="a directory, a file, or a .tar/.tar.gz/.zip")
    up.add_argument("-n", "--namespace", help="the Model's namespace (default: the "
                    "kubeconfig context's, else default)")
    up.add_argument("--kubeconfig", help="default: in-cluster, else KUBECONFIG or "
                    "~/.kube/config")
    up.add_argument("--url", help="the session URL (status.upload.url), instead of reading "
                    "the Model")
    up.add_argument("--token-file", help="with --url: a file holding the session token "
                    "(or MODELCACHE_UPLOAD_TOKEN)")
    up.set_defaults(func=upload.cmd_upload)

    pl = sub.add_parser("pull", help="pull a ModelPack into a new directory, verified",
                        description="Pull a ModelPack into DEST. Every file is checked against "
                        "its digest; DEST appears only when all files verified. An interrupted "
                        "pull resumes where it stopped when run again.")
    pl.add_argument("ref", metavar="REF", help="HOST/REPO[:TAG][@sha256:…]")
    pl.add_argument("dest", metavar="DEST", help="a directory that does not exist or is empty")
    pl.add_argument("-j", "--jobs", type=int, default=4, help="files in parallel (default 4)")
    pl.add_argument("--range-streams", type=int, default=8,
                    help="byte ranges fetched at once for a file of 256 MiB or more whose "
                         "one stream proves slow (default 8; 1: one stream)")
    pl.add_argument("--registry-mirror", action="append", default=[], metavar="HOST=URL",
                    help="ask URL first for HOST's blobs and pinned manifests (repeatable, "
                         "in order; every byte is verified, the registry is the fallback)")
    pl.add_argument("--registry-hosts-dir", metavar="DIR",
                    help="mirrors in containerd's certs.d layout: DIR/HOST/hosts.toml")
    access.add_flags(pl)
    pl.set_defaults(func=pull.cmd_pull)

    ins = sub.add_parser("inspect", help="print format, metadata, files and digest",
                         description="Describe a model directory, an OCI layout or a registry "
                         "reference: format, family, parameter count, files, digest.")
    ins.add_argument("target", metavar="REF|DIR")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ins.add_argument("--tag", default=None, help="which manifest of an OCI layout")
    ins.add_argument("--format", default="Auto", help=argparse.SUPPRESS)
    ins.add_argument("--allow-pickle", action="store_true",
                     help="describe pickle weights instead of refusing them")
    access.add_flags(ins)
    ins.set_defaults(func=pull.cmd_inspect)

    dm = sub.add_parser("demo", help="the whole system on this machine, with a real model",
                        description="Start etcd + kube-apiserver, the registry, a local hub, "
                        "the controller and the node plugin on loopback; publish a real model "
                        "as a Model and mount it read-only as kubelet would (needs root).")
    if with_demo:
        from cli import demo  # start-up time: see above

        demo.add_arguments(dm)
    dm.set_defaults(func=cmd_demo)

    ex = sub.add_parser("export", help="write a Ready ClusterModel as an air-gap bundle (tar)",
                        description="Read the ClusterModel from the API server, pull its "
                        "artifact by digest from the cluster registry, verified, and write one "
                        "tar: an OCI image layout plus the CR (clustermodel.yaml, annotated "
                        "with the digest). The same model always gives the same bytes; the "
                        "bundle's sha256 is printed. Carry it across, then `modelcache import`.")
    ex.add_argument("name", metavar="CLUSTERMODEL", help="the ClusterModel (must be Ready; "
                    "a namespaced Model cannot be exported)")
    ex.add_argument("--output", "-o", required=True, metavar="BUNDLE.tar",
                    help="the bundle to write (appears only once complete and verified)")
    ex.add_argument("--registry", metavar="HOST:PORT", help="the cluster registry as reachable "
                    "from here (default: the host in status.artifact.reference)")
    im = sub.add_parser("import", help="verify an air-gap bundle, push it, apply its ClusterModel",
                        description="Verify every entry and digest of a bundle made by "
                        "`modelcache export` (a tampered, truncated or unsafe bundle is refused "
                        "with a reason, and nothing is pushed or applied), push the model to "
                        "this cluster's registry, manifest last, and apply the ClusterModel "
                        "with modelcache.io/imported-digest: the controller adopts the pushed "
                        "artifact and never contacts the original source. updatePolicy does not "
                        "apply to an imported model; import a newer bundle to update it.")
    im.add_argument("bundle", metavar="BUNDLE.tar")
    im.add_argument("--registry", metavar="HOST:PORT",
                    help="the cluster registry (DMCR) as reachable from here (default: "
                    "$MODELCACHE_REGISTRY, else the host this cluster's ClusterModels are "
                    "published to, from their status.artifact.reference)")
    im.add_argument("-j", "--jobs", type=int, default=4, help="blobs in parallel (default 4)")
    im.add_argument("--wait", type=float, metavar="SECONDS", default=0,
                    help="wait until the controller reports the ClusterModel Ready")
    for sp in (ex, im):
        sp.add_argument("--kubeconfig", help="default: in-cluster, else KUBECONFIG or "
                        "~/.kube/config")
        access.add_flags(sp)
        progress.add_flags(sp)
    ex.set_defaults(func=cmd_export)
    im.set_defaults(func=cmd_import)

    for name in ("pack", "pull", "upload"):
        progress.add_flags(sub.choices[name])
    return p


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    args = build_parser(with_demo="demo" in words).parse_args(argv)
    stop_logs = logs.setup("info" if args.verbose else "warning", "text")
    if not args.verbose:  # its retry warnings would break the one-line failure; -v shows them
        logging.getLogger("urllib3").setLevel(logging.ERROR)
    try:
        rc: int = args.func(args)
        return rc
    except errors.CommandError as e:
        return _fail(e.reason, e, e.code)
    except (ModelPackError, JobError) as e:
        return _fail(e.reason, e)
    except kube.ApiError as e:
        return _fail("ApiError", e)
    except KeyboardInterrupt:
        return _fail("Interrupted", "stopped; run again to resume", errors.INTERRUPTED)
    except OSError as e:
        return _fail("IOError", e)
    finally:
        stop_logs()  # every line logged is written before main returns


def _fail(reason: str, message: object, code: int = errors.FAILURE) -> int:
    """The one line of every failure (a message never spans lines)."""
    text = " ".join(str(message).split())
    print(f"modelcache: {reason}: {text}", file=sys.stderr)
    return code


def run() -> NoReturn:
    """The ``modelcache`` command: ``main``, then exit without the interpreter's teardown.

    The teardown (freeing every module, buffer and connection a command
    made) took ~20 ms after ``--help`` here and ~80 ms after a cold 2 GiB pull
    (4 %, bench/RESULTS.md). Nothing is lost by skipping it: the logs were
    written when ``main`` returned and the std streams are flushed here; a
    thread still running (after Ctrl-C) is dropped as a crash would drop it
    (a pull or an upload run again resumes).
    """
    try:
        code = main()
    except SystemExit as e:  # argparse: --help, or a usage error already printed
        if not isinstance(e.code, int | None):
            raise
        code = e.code or 0
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):  # a reader that went away, or a stream closed
        code = code or errors.FAILURE
    os._exit(code)


if __name__ == "__main__":
    run()
