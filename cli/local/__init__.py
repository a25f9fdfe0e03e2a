"""cli/local."""
