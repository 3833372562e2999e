"""Synthetic fluoroscopy data engine (DRRs, projected masks, tools, domain randomization, shards)."""
