"""The math shared by model and engine: linear attention and sampling, a PyTorch reference (the definition)
and Triton kernels behind one call each. Imports nothing of berrylm."""
