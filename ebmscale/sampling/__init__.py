from ebmscale.sampling.langevin import LangevinStats, frozen, langevin, model_energy

__all__ = ["langevin", "frozen", "model_energy", "LangevinStats"]
