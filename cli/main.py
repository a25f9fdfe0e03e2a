"""``modelcache``: pack, pull and inspect ModelPacks from the command line.

Every failure ends with exit code 1 and one line ``modelcache: REASON: message``;
usage errors exit 2. Registry credentials come from flags, the environment
(MODELCACHE_REGISTRY_USERNAME / MODELCACHE_REGISTRY_PASSWORD /
MODELCACHE_REGISTRY_TOKEN) or ~/.docker/config.json, never from a log.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

from cli.progress import bar, open_bar
from modelpack.errors import ModelPackError
from modelpack.formats import inspect_dir
from modelpack.oci import layout as oci_layout
from modelpack.oci.reference import Reference
from modelpack.oci.reference import parse as parse_ref
from modelpack.oci.registry import RegistryClient
from modelpack.pack import pack_to_layout, pack_to_registry
from modelpack.pull import pull_to_dir, resolve

DESCRIPTION = """\
modelcache moves AI model weights: it verifies a model (safetensors, GGUF,
diffusers; pickle refused), packages it as an OCI ModelPack (one layer per
file, no conversion), pushes it to a registry, and pulls it back verified.

examples:
  modelcache pack ./qwen --push 127.0.0.1:5000/models/qwen:v1 --insecure
  modelcache pack ./qwen --output ./qwen-oci
  modelcache pull 127.0.0.1:5000/models/qwen:v1 ./qwen-copy --insecure
  modelcache inspect ./qwen --json
"""


def _client(args: argparse.Namespace, ref: Reference) -> RegistryClient:
    username = args.username or os.environ.get("MODELCACHE_REGISTRY_USERNAME")
    password = os.environ.get("MODELCACHE_REGISTRY_PASSWORD")
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    token = os.environ.get("MODELCACHE_REGISTRY_TOKEN")
    insecure = args.insecure or ref.host.split(":")[0] in ("127.0.0.1", "localhost") and \
        os.environ.get("MODELCACHE_LOOPBACK_TLS") != "1"
    return RegistryClient(ref.host, insecure=insecure, username=username, password=password,
                          token=None if username else token, ca_bundle=args.ca_file)


def _add_registry_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("registry access")
    g.add_argument("--insecure", action="store_true",
                   help="plain HTTP (loopback registries are plain HTTP by default)")
    g.add_argument("--ca-file", help="CA bundle to verify the registry's TLS certificate")
    g.add_argument("--username", help="basic-auth user (or MODELCACHE_REGISTRY_USERNAME)")
    g.add_argument("--password-stdin", action="store_true",
                   help="read the password from standard input (or MODELCACHE_REGISTRY_PASSWORD)")


def _summary(meta: dict[str, Any]) -> str:
    keys = ("format", "family", "architecture", "parameterCount", "precision",
            "quantization", "contextLength", "tensors", "files", "sizeBytes")
    return "\n".join(f"  {k:<15} {meta.get(k)}" for k in keys if meta.get(k) is not None)


def cmd_pack(args: argparse.Namespace) -> int:
    src = args.source
    if not os.path.isdir(src):
        return _pack_remote(args)
    info = inspect_dir(src, args.format, args.allow_pickle)
    t0 = time.monotonic()
    with bar(info.size, "pack", args.progress) as progress:
        if args.push:
            ref = parse_ref(args.push)
            res = pack_to_registry(info, _client(args, ref), ref, progress=progress)
        else:
            res = pack_to_layout(info, args.output, args.tag, progress=progress)
    dt = time.monotonic() - t0
    where = res.reference or f"{args.output} (OCI layout, tag {args.tag})"
    print(f"packed {len(info.files)} files, {info.size} bytes in {dt:.2f}s")
    print(f"digest: {res.pack.digest}")
    print(f"stored: {where}")
    return 0


def _pack_remote(args: argparse.Namespace) -> int:
    """A remote source (hf://, ollama://, http(s)://, s3://): staged, verified, published."""
    from ingest.publish import Options, PublishError, delta_sink, publish_uri
    from ingest.sources import SourceError

    if "://" not in args.source:
        print(f"modelcache: InvalidSource: {args.source} is neither a directory nor a URI",
              file=sys.stderr)
        return 1
    options = Options(expected_format=args.format, allow_pickle=args.allow_pickle)
    creds = {k: v for k, v in (("include", args.include), ("exclude", args.exclude),
                               ("sha256", args.sha256)) if v}
    t0 = time.monotonic()
    try:
        with open_bar("pack", args.progress) as (update, set_total):
            sink = delta_sink(update, set_total)
            if args.push:
                ref = parse_ref(args.push)
                res = publish_uri(args.source, push=args.push, client=_client(args, ref),
                                  progress=sink, options=options, **creds)
            else:
                res = publish_uri(args.source, output=args.output, progress=sink,
                                  options=options, **creds)
    except (PublishError, SourceError) as e:
        print(f"modelcache: {e.reason}: {e}", file=sys.stderr)
        return 1
    print(f"packed {res.resolved.get('files')} files, {res.size} bytes "
          f"in {time.monotonic() - t0:.2f}s from {args.source} (revision {res.revision})")
    print(f"digest: {res.digest}")
    print(f"stored: {res.reference or args.output}")
    return 0


def cmd_upload(args: argparse.Namespace) -> int:
    from jobs.upload_client import UploadError, upload

    token = os.environ.get("MODELCACHE_UPLOAD_TOKEN")
    if args.token_file:
        with open(args.token_file) as f:
            token = f.read().strip()
    if not args.url or not token:
        print("modelcache: MissingUploadSession: give --url and --token-file (or "
              "MODELCACHE_UPLOAD_TOKEN) from the Model's status.upload", file=sys.stderr)
        return 2
    try:
        with open_bar(f"upload {args.model}", args.progress) as (update, set_total):
            state = {"done": 0, "total": 0}

            def progress(done: int, total: int) -> None:
                if total != state["total"]:
                    state["total"] = total
                    set_total(total)
                update(done - state["done"])
                state["done"] = done

            status = upload(args.url, token, args.path, progress=progress)
    except UploadError as e:
        print(f"modelcache: {e.reason}: {e}", file=sys.stderr)
        return 1
    print(f"uploaded {args.path} to {args.model}: {status.get('phase')}")
    if status.get("result"):
        print(f"digest: {status['result'].get('digest')}")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    ref = parse_ref(args.ref)
    client = _client(args, ref)
    pack = resolve(client, ref)
    t0 = time.monotonic()
    with bar(pack.size, "pull", args.progress) as progress:
        pull_to_dir(client, ref.with_digest(pack.digest), args.dest, progress=progress,
                    workers=args.jobs, pack=pack)
    dt = time.monotonic() - t0
    rate = pack.size / dt / 1e6 if dt > 0 else 0.0
    print(f"pulled {len(pack.layers)} files, {pack.size} bytes in {dt:.2f}s ({rate:.0f} MB/s)")
    print(f"digest: {pack.digest}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    target = args.target
    out: dict[str, Any]
    if os.path.isdir(target) and oci_layout.is_layout(target):
        pack, _ = oci_layout.read(target, args.tag)
        out = {"source": "oci-layout", "digest": pack.digest, **pack.metadata(),
               "layers": [{"path": x.path, "digest": x.digest, "size": x.size,
                           "mediaType": x.media_type} for x in pack.layers]}
    elif os.path.isdir(target):
        info = inspect_dir(target, args.format, args.allow_pickle)
        meta = info.summary()
        out = {"source": "directory", "format": meta["format"], "family": meta["family"],
               "architecture": meta["architecture"], "parameterCount": meta["parameter_count"],
               "precision": meta["precision"], "quantization": meta["quantization"],
               "contextLength": meta["context_length"], "tensors": meta["tensors"],
               "files": len(info.files), "sizeBytes": info.size,
               "layers": [{"path": f.path, "size": f.size, "kind": f.kind} for f in info.files]}
    else:
        ref = parse_ref(target)
        pack = resolve(_client(args, ref), ref)
        out = {"source": "registry", "reference": str(ref.with_digest(pack.digest)),
               "digest": pack.digest, **pack.metadata(),
               "layers": [{"path": x.path, "digest": x.digest, "size": x.size,
                           "mediaType": x.media_type} for x in pack.layers]}
    if args.json:
        print(json.dumps(out, indent=2, sort_keys=True))
        return 0
    if out.get("digest"):
        print(f"digest: {out['digest']}")
    print(_summary(out))
    print("files:")
    for layer in out["layers"]:
        print(f"  {layer['size']:>14}  {layer['path']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from cli import bundle

    kc = bundle.connect(args.kubeconfig)
    try:
        obj = bundle.ready_cluster_model(kc, args.name)
    finally:
        kc.close()
    host = args.registry or bundle.registry_host(obj)
    if not host:
        print("modelcache: MissingRegistry: the model's status names no registry; "
              "give --registry HOST:PORT", file=sys.stderr)
        return 1
    client = _client(args, Reference(host, "x"))
    t0 = time.monotonic()
    with bar(int(obj["status"]["artifact"].get("sizeBytes") or 0), "export",
             args.progress) as progress:
        res = bundle.export_bundle(obj, client, args.output, progress)
    dt = time.monotonic() - t0
    rate = res.model_bytes / dt / 1e6 if dt > 0 else 0.0
    print(f"exported ClusterModel {args.name}: {res.blobs} blobs, {res.model_bytes} bytes "
          f"in {dt:.2f}s ({rate:.0f} MB/s)")
    print(f"digest: {res.digest}")
    print(f"bundle: {res.path} ({res.bundle_bytes} bytes, {res.sha256})")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from cli import bundle

    t0 = time.monotonic()
    with bar(os.path.getsize(args.bundle), "verify", args.progress) as progress:
        b = bundle.verify(args.bundle, progress)
    kc = bundle.connect(args.kubeconfig)
    try:
        bundle.apply(kc, b.cr, dry_run=True)  # a CR this cluster refuses stops before a push
        client = _client(args, Reference(args.registry, "x"))
        with bar(sum(e.size for e in b.blobs.values()), "push", args.progress) as progress:
            ref = bundle.push(b, client, bundle.repository(b), progress, args.jobs)
        bundle.apply(kc, b.cr)
        dt = time.monotonic() - t0
        rate = b.pack.size / dt / 1e6 if dt > 0 else 0.0
        print(f"imported ClusterModel {b.name}: {len(b.pack.layers)} files, {b.pack.size} bytes "
              f"verified and pushed in {dt:.2f}s ({rate:.0f} MB/s)")
        print(f"digest: {b.digest}")
        print(f"pushed: {ref}")
        if args.wait:
            bundle.wait_ready(kc, b.name, b.digest, args.wait)
            print(f"ready: ClusterModel {b.name}")
        else:
            print(f"applied: ClusterModel {b.name} (the controller adopts the artifact)")
    finally:
        kc.close()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from cli import demo

    return demo.run_args(args)


def build_parser(with_demo: bool = True) -> argparse.ArgumentParser:
    """The whole command line; ``with_demo=False`` leaves out the demo's own flags.

    The demo's module brings in the local cluster, yaml and cryptography (tens of
    ms at every start); ``main`` builds them only when "demo" is on the command line.
    """
    p = argparse.ArgumentParser(prog="modelcache", description=DESCRIPTION,
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
                    choices=["Auto", "Safetensors", "GGUF", "Diffusers"],
                    help="the format you expect; anything else is refused")
    pk.add_argument("--allow-pickle", action="store_true",
                    help="package pickle weights (.bin/.pt/.pth/.ckpt); they run code on load")
    src = pk.add_argument_group("remote sources (credentials from HF_TOKEN, HF_ENDPOINT, AWS_*)")
    src.add_argument("--include", action="append", metavar="GLOB",
                     help="only files matching GLOB (repeatable; Hugging Face, S3)")
    src.add_argument("--exclude", action="append", metavar="GLOB",
                     help="skip files matching GLOB (repeatable)")
    src.add_argument("--sha256", help="expected sha256 of an http(s) download")
    _add_registry_flags(pk)
    pk.set_defaults(func=cmd_pack)

    up = sub.add_parser("upload", help="upload local files to a Model with source.upload",
                        description="Upload a directory, a file or a tar/zip to a Model's "
                        "upload session (status.upload: URL and token Secret). Resumes after a "
                        "cut connection; waits until the model is verified and published.")
    up.add_argument("model", metavar="MODEL", help="the Model's name (for messages)")
    up.add_argument("path", metavar="PATH", help="a directory, a file, or a .tar/.tar.gz/.zip")
    up.add_argument("--url", help="the session URL from status.upload.url")
    up.add_argument("--token-file", help="a file holding the session token "
                    "(or MODELCACHE_UPLOAD_TOKEN)")
    up.set_defaults(func=cmd_upload)

    pl = sub.add_parser("pull", help="pull a ModelPack into a new directory, verified",
                        description="Pull a ModelPack into DEST. Every file is checked against "
                        "its digest; DEST appears only when all files verified. An interrupted "
                        "pull resumes where it stopped when run again.")
    pl.add_argument("ref", metavar="REF", help="HOST/REPO[:TAG][@sha256:…]")
    pl.add_argument("dest", metavar="DEST", help="a directory that does not exist or is empty")
    pl.add_argument("-j", "--jobs", type=int, default=4, help="files in parallel (default 4)")
    _add_registry_flags(pl)
    pl.set_defaults(func=cmd_pull)

    ins = sub.add_parser("inspect", help="print format, metadata, files and digest",
                         description="Describe a model directory, an OCI layout or a registry "
                         "reference: format, family, parameter count, files, digest.")
    ins.add_argument("target", metavar="REF|DIR")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ins.add_argument("--tag", default=None, help="which manifest of an OCI layout")
    ins.add_argument("--format", default="Auto", help=argparse.SUPPRESS)
    ins.add_argument("--allow-pickle", action="store_true",
                     help="describe pickle weights instead of refusing them")
    _add_registry_flags(ins)
    ins.set_defaults(func=cmd_inspect)

    dm = sub.add_parser("demo", help="the whole system on this machine, with a real model",
                        description="Start etcd + kube-apiserver, the registry, a local hub, "
                        "the controller and the node plugin on loopback; publish a real model "
                        "as a Model and mount it read-only as kubelet would (needs root).")
    if with_demo:
        from cli import demo

        demo.add_arguments(dm)
    dm.set_defaults(func=cmd_demo)

    ex = sub.add_parser("export", help="write a Ready ClusterModel as an air-gap bundle (tar)",
                        description="Read the ClusterModel from the API server, pull its "
                        "artifact by digest from the cluster registry, verified, and write one "
                        "tar: an OCI image layout plus the CR (clustermodel.yaml, annotated "
                        "with the digest). The same model always gives the same bytes; the "
                        "bundle's sha256 is printed. Carry it across, then `modelcache import`.")
    ex.add_argument("name", metavar="CLUSTERMODEL", help="the ClusterModel (must be Ready)")
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
    im.add_argument("--registry", required=True, metavar="HOST:PORT",
                    help="the cluster registry (DMCR) as reachable from here")
    im.add_argument("-j", "--jobs", type=int, default=4, help="blobs in parallel (default 4)")
    im.add_argument("--wait", type=float, metavar="SECONDS", default=0,
                    help="wait until the controller reports the ClusterModel Ready")
    for sp in (ex, im):
        sp.add_argument("--kubeconfig", help="default: in-cluster, else KUBECONFIG or "
                        "~/.kube/config")
        _add_registry_flags(sp)
        sp.add_argument("--progress", dest="progress", action="store_true", default=None,
                        help="always show the progress bar (default: only on a terminal)")
        sp.add_argument("--no-progress", dest="progress", action="store_false")
    ex.set_defaults(func=cmd_export)
    im.set_defaults(func=cmd_import)

    for name in ("pack", "pull", "upload"):
        sp = sub.choices[name]
        sp.add_argument("--progress", dest="progress", action="store_true", default=None,
                        help="always show the progress bar (default: only on a terminal)")
        sp.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    args = build_parser(with_demo="demo" in words).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    try:
        rc: int = args.func(args)
        return rc
    except ModelPackError as e:
        print(f"modelcache: {e.reason}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("modelcache: Interrupted: stopped; run again to resume", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"modelcache: IOError: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
