"""Networks: backbones by name, BYOL heads, the authors' init, and the online/target model."""

from orl.models.backbones import BACKBONES, Backbone, build_backbone
from orl.models.heads import MLPHead
from orl.models.init import init_weights
from orl.models.orl_model import ORLModel, build_model

__all__ = ["BACKBONES", "Backbone", "build_backbone", "MLPHead", "ORLModel", "build_model", "init_weights"]
