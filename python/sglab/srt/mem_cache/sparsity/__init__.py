"""Sparse attention over the HiSparse KV tier: the config and the Quest page selector."""
