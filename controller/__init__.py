"""The control plane: reconcilers, publish worker, sources, webhook, catalog."""
