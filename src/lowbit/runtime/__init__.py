"""The packed runtime: packed linears, the decode loop, kernels and resident memory."""
