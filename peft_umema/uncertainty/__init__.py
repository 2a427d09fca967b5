"""Uncertainty Modeling (UM), paper section 3.1."""
