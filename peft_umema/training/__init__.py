"""Training with the HF Trainer: the joint UMEMA objective and memory commits after each optimizer step."""
