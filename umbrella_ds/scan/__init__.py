"""Reading and preprocessing one raw scan, shared by packing (``umbrella-pack``) and inference.

``readers`` decodes a NIfTI or a SwiFT frame folder into a canonical (RAS+) float32 array;
``preprocess`` resizes, normalises and casts it to the float16 the shards store. Both live in the
runtime package so ``umbrella-infer`` preprocesses a new scan with the packing code itself
without importing the packing tool (``umbrella-pack``'s package, which imports this one).
Import the submodules directly: this package imports nothing, so ``import umbrella_ds`` stays
free of nibabel.
"""
