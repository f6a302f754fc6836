"""The quantizer core: quantizers, packing, the QuantConfig and layer surgery, rotations."""
