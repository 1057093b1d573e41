"""Training: text -> corpus -> tokens in data/, then pretraining, chat SFT, evals and reports -> a checkpoint."""
