"""Held-out evaluation: reconstruction and sparsity, the cost of splicing into the model, ground truth."""
