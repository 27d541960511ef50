"""Weights I/O: PyTorch checkpoint porting, converted-checkpoint store, the checkpoint resolver."""
