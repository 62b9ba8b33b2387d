"""Token labels from the corpus's own structure: what `pipeline label` computes and `pipeline probe` reads."""
