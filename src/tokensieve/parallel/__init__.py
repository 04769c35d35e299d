"""Tensor parallelism on `torch.distributed`: one rank's share of the model (`shard`), the leader that drives
the other ranks through the layer loop (`leader`), and how the ranks start (`launch`). The group and its
collectives live below the model, in `tokensieve.collectives`, since the model and the scorers call them."""
