"""Weight-only quantization: policy (which kernel for which tensor), math (the codes), calibrate (GPTQ's statistics),
rewrite (the graph's marked nodes replaced)."""
