"""The content-addressed store: verified blobs and read-only model trees."""
