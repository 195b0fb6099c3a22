"""Instruction data: predecessor formats -> tokens, labels, images, batches."""
