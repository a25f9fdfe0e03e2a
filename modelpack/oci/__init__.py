"""OCI: ModelPack manifests and configs, registry client, image layout."""
