"""Models: references, GGUF conversion, loading, architecture adapters and safetensors checkpoints."""
