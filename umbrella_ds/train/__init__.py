"""Training under DeepSpeed ZeRO: environment, loop, checkpoints, evaluation, export."""
