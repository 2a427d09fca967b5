"""Uncertainty baselines (temperature scaling, MC dropout, ensembles, SWAG, AdUE, Laplace) for PEFT LoRA classifiers;
also the PEFT baselines LISA and MixLoRA."""
