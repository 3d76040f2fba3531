"""Gated ResNets behind a registry: `create_model("resnet20", num_classes=10, in_channels=1)`."""

from cap.core.blocks import BasicBlock, Bottleneck, GatedBlock, RemovedBlock
from cap.models import resnet  # noqa: F401  (registers the models)
from cap.models.build import ArchitectureError, build_from_architecture, load_architecture, load_trained
from cap.models.registry import create_model, list_models, register_model
from cap.models.resnet import GatedResNet

__all__ = ["ArchitectureError", "BasicBlock", "Bottleneck", "GatedBlock", "GatedResNet", "RemovedBlock",
           "build_from_architecture", "create_model", "list_models", "load_architecture", "load_trained",
           "register_model"]
