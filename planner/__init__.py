"""fx-planner: automatic parallelism planning for PyTorch models."""
