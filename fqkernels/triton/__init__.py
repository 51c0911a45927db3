"""Triton kernels of fqkernels (imported lazily by the op modules: triton is optional
and slow to import, and TRITON_INTERPRET must be set before these modules load)."""
