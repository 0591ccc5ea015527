"""Float64 oracles written from the math. They import neither kernels/ nor properties/."""
