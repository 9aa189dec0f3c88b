from ebmscale.models.resnet import ARCH_BLOCKS, EnergyModel, build_model, count_parameters, set_dropout

__all__ = ["ARCH_BLOCKS", "EnergyModel", "build_model", "count_parameters", "set_dropout"]
