"""Task and calibration metrics, and reliability diagrams, shared by training, baselines and benchmarks."""
