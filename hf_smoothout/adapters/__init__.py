"""Distributed back-ends SmoothOut runs under, one module each (DeepSpeed ZeRO; DDP needs no adapter)."""
