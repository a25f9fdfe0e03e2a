"""The demo's and the tests' local system: real programs on loopback.

``cluster`` (etcd + kube-apiserver from the Go-built binaries, with ``pki``:
the throwaway CA and admin credentials), ``registry`` (a DMCR: Debian's
``docker-registry``), ``hub`` (a Hugging Face Hub-compatible server for the
real MiniLM model) and ``system`` (starting and supervising the manager and
the node plugin for ``modelcache demo``).
"""
