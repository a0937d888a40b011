"""The launchers' logic: local multi-process, SLURM, Cloud TPU VMs, Kubernetes. `launch/*.py` are thin entry points."""
