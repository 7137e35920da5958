"""Which tensors are quantized and to how many bits, from names, dtypes and shapes only (torch-free)."""
