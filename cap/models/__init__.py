"""Gated ResNets behind a registry: `create_model("resnet20", num_classes=10, in_channels=1)`."""

from cap.models import resnet  # noqa: F401  (registers the models)
from cap.models.blocks import BasicBlock, Bottleneck, GatedBlock, RemovedBlock
from cap.models.registry import create_model, list_models, register_model
from cap.models.resnet import GatedResNet

__all__ = ["BasicBlock", "Bottleneck", "GatedBlock", "GatedResNet", "RemovedBlock", "create_model",
           "list_models", "register_model"]
