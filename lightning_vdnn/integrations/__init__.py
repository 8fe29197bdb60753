"""Entry points: Lightning (single device, DeepSpeed, multi-rank streaming, checkpoint IO), Fabric, Accelerate, plain PyTorch."""
