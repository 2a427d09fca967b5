"""Experiment drivers above the library: methods and their registry, train/evaluate/predict run folders, the
side-by-side comparison, offline backbones. The library packages never import this one."""
