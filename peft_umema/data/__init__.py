"""Benchmark loaders and preprocessing (tokenization, k-shot subsets, input corruption) for UMEMA experiments."""
