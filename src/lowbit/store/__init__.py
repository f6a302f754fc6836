"""Storage: atomic output, safetensors reading and writing, the quantized folder."""
