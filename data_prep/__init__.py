"""Packing: NIfTI volumes, rsfMRI series and phenotypes into sharded, checksummed HDF5."""
