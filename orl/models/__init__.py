"""Networks: backbones by name, BYOL heads, and the online/target model for stages 1 and 3."""

from orl.models.backbones import BACKBONES, Backbone, build_backbone
from orl.models.heads import MLPHead
from orl.models.orl_model import ORLModel, build_model

__all__ = ["BACKBONES", "Backbone", "build_backbone", "MLPHead", "ORLModel", "build_model"]
