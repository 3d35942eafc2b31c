"""nn.Module layers and helpers that flash_attn 2.x code imports (rotary embeddings)."""
