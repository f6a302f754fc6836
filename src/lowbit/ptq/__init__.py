"""Post-training quantization: RTN, GPTQ (in memory and streamed) and the method registry."""
