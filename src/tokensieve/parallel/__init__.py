"""Tensor parallelism on `torch.distributed`: one rank's share of the model (`shard`), the group and its
collectives (`group`), and the leader that drives the other ranks through the layer loop (`leader`)."""
