"""Fused operations beside attention (the names flash_attn 2.x code imports)."""
