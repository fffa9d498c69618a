"""Benchmarks of timm-alps: overhead, training throughput, robustness, paper reproduction."""
