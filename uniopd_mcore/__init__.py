"""uniopd-mcore: the Uni-OPD on-policy distillation recipe on a Megatron-Core learner."""

__version__ = "0.1.0"
