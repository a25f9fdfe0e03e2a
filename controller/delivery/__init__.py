"""Workload delivery: admission webhook, scheduling gates, SharedPVC."""
