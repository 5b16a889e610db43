"""Running a base model on long inputs: loading bases, attention kernels, the KV cache and Mamba carry, the chunked runner, measurement."""
