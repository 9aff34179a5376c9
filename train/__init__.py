"""Model, optimizer, trainer and config of the mmpt pretraining system."""
