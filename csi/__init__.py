"""NodeCache: the CSI node plugin that delivers ModelPacks to pods.

Where things happen: ``identity.py`` and ``node.py`` serve the two CSI
services; ``cache/`` keeps the node-local content-addressed cache, a
module per job (store, pull, evict, scrub, inventory, recover); ``mounts.py``
reads ``/proc/self/mountinfo`` and makes read-only bind mounts;
``resolvers/`` turns a volume's ``model``/``clusterModel`` into a registry
reference (``base.py`` the seam, ``file.py`` and ``kube.py`` the two
sources); ``nodelabels.py`` and ``prefetch.py`` are the background loops
on the Kubernetes side (``debounced.py``), on the toolkit's client and
informer (``kube/``); ``errors.py`` maps every failure to a gRPC code, once;
``server.py`` wires them into a gRPC server; ``main.py`` is the command.
The gRPC stubs are generated from ``proto/csi.proto`` by ``stubs.py``.
"""
