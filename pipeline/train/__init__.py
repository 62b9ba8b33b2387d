"""Training: the loader that streams shuffled activations, the trainer of several SAEs on one read, checkpoints."""
