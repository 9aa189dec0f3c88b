from ebmscale.models.multiscale import MultiScaleEnergy, build_model
from ebmscale.models.pretrained import is_exported, load_pretrained
from ebmscale.models.resnet import ARCH_BLOCKS, EnergyModel, count_parameters, set_dropout

__all__ = ["ARCH_BLOCKS", "EnergyModel", "MultiScaleEnergy", "build_model", "count_parameters", "is_exported",
           "load_pretrained", "set_dropout"]
