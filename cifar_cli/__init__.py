"""cifar-cli: a LightningCLI image-classification trainer for CIFAR-10, CIFAR-100 and image folders."""

from cifar_cli.errors import UsageError

__all__ = ["UsageError"]
