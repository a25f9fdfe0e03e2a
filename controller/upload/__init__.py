"""The upload gateway: per-model upload sessions feeding the publish worker."""
