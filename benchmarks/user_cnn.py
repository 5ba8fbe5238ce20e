"""A user's own model for benchmarks/user_model.py: a plain MNIST CNN (conv32-conv64-pool-fc45-fc10,
434,041 parameters). Input float32 (batch, 1, 28, 28) in [0, 1]; logits float32 (batch, 10)."""
import torch.nn as nn


def build():
    return nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64 * 12 * 12, 45), nn.ReLU(), nn.Linear(45, 10))
