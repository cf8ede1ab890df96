"""The shared building blocks of every network: attention, resnet blocks, embeddings, norms, LoRA layers."""
