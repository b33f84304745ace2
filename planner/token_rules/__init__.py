"""Image-to-token rules of the tiling and fixed-view families, one module per processor (discovered by tokens.py)."""
