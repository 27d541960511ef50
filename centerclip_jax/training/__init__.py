"""Training: train_and_evaluate, the train step, optimizer, losses, checkpoints."""
