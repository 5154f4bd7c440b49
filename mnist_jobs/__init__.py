"""mnist-jobs: MNIST training jobs and hyperparameter sweeps, locally or on SLURM."""

__version__ = "0.1.0"
