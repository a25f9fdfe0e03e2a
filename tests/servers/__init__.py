"""Test servers on loopback: a Hugging Face Hub-compatible server, an Ollama-style registry, S3."""
