"""csi/resolvers."""
