"""Osprey's benchmark: Osprey vs TorchServe 0.12 vs FastAPI vs the raw PyTorch ceiling.

Run ``python -m benchmarks.run [--quick]``; see benchmarks/README.md.
"""
