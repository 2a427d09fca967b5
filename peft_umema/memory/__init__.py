"""External Memory Augmentation (EMA), paper section 3.2."""
