"""Triton kernels with torch reference implementations and a dispatcher. Pure torch + triton."""
