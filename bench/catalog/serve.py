"""The catalog benchmark's server process: cluster A's catalog API as the manager builds it.

``bench.catalog.run`` starts this as its own process (in a cluster the
catalog lives in A's manager, not in the importer), so the proxy and the
importer do not share one interpreter. It is ``controller.catalog.server.build``
over a ClusterModel informer, with the controller ServiceAccount's kubeconfig
(TokenReview and SubjectAccessReview under daemonset/controller-rbac.yaml)
and a plain-HTTP client to A's registry, the production defaults otherwise
(decision TTL 10 s, 50 requests/s per client, burst 200), a self-signed
certificate for 127.0.0.1.

Prints ``{"url": …, "ca": PEM}`` as one JSON line once serving; stops at
the end of its standard input.

    python3 -m bench.catalog.serve --kubeconfig PATH --registry HOST:PORT
"""

from __future__ import annotations

import argparse
import json
import sys
import threading

from controller.catalog import server as catalog_server
from kube import client as k
from kube.informer import Informer
from modelpack.oci.registry import RegistryClient


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kubeconfig", required=True, help="the controller's own rights")
    ap.add_argument("--registry", required=True, help="A's registry, HOST:PORT (plain HTTP)")
    args = ap.parse_args()
    client = k.Kube.from_config(args.kubeconfig)
    informer = Informer(client, k.CLUSTER_MODELS)
    informer.start()
    if not informer.synced.wait(30):
        raise SystemExit("ClusterModel informer did not sync in 30 s")
    cfg = catalog_server.Config(listen=("127.0.0.1", 0), hosts=("127.0.0.1", "localhost"))
    server = catalog_server.build(cfg, client, informer,
                                  lambda: RegistryClient(args.registry, insecure=True))
    assert server.cert_pem is not None
    threading.Thread(target=server.serve_forever, daemon=True, name="catalog").start()
    print(json.dumps({"url": f"https://127.0.0.1:{server.server_address[1]}",
                      "ca": server.cert_pem.decode()}), flush=True)
    try:
        sys.stdin.read()
    finally:
        server.shutdown()
        server.server_close()
        informer.stop()
        client.close()


if __name__ == "__main__":
    main()
