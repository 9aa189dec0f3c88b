"""Reservoir sampling for the replay buffer (the ICD release's `ReservoirBuffer`, Vitter's algorithm R).
The class lives in buffer.py beside ReplayBuffer and build_buffer (which picks it); this name stays importable.

The ring buffer keeps the newest `capacity` chains; the reservoir keeps a uniform sample of every chain ever
pushed: the n-th sample (1-based, over the rank's whole run) enters with probability capacity / n and then
replaces a uniformly chosen slot. Old modes of the sampler stay represented, which the ICD paper credits
with more diverse negatives. Storage, encoding, sampling and chain starts are the ring's (buffer.py).

State: the ring's, plus `seen` (samples pushed so far). Re-sharding (buffer.reshard) splits `seen` evenly
over the new ranks, so each keeps admitting new samples at the rate its share of the history implies.
"""
from ebmscale.buffer import ReservoirBuffer  # noqa: F401  (it lives beside ReplayBuffer and build_buffer)
