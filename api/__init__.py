"""The contract every component agrees on, as pure code (no I/O, no client).

``names`` (annotations, labels, finalizers, CSI volume attributes, node
labels, SharedPVC names), ``model`` (the frozen ``ModelView`` of a Model or
ClusterModel and the resolved-metadata field list), ``conditions`` (phases
and condition documents), ``jobresult`` (the Job result protocol: exit
codes, termination message, retryable vs terminal, written by ``jobs`` and
read by the controller), and ``inject``/``podspec`` (what a workload's pod
spec gets for its models: the runtime contract of DESIGN.md). Everything
above imports these; they import only ``modelpack``.
"""
