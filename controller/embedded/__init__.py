"""The controller's embedded mode: the whole system on one machine without a kubelet.

In a cluster, publish Jobs run as pods. On one machine with only etcd and
kube-apiserver (``modelcache demo``), ``jobrunner`` plays the Job controller
and the kubelet for the manager's own Jobs, running each as a local process.
"""
