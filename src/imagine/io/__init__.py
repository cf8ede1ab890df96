"""Files at the edge: safetensors and config.json, PNG metadata, key maps for foreign checkpoints and adapters."""
