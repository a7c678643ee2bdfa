"""Triton kernels of uniopd-mcore (import name ``uniopd_kernels``); depends on torch and triton only."""

from uniopd_kernels.advantages import AdvantageOutput
from uniopd_kernels.advantages import uniopd_advantages
from uniopd_kernels.linear_token_logprobs import LinearTokenLogprobsFunction
from uniopd_kernels.linear_token_logprobs import linear_token_logprobs
from uniopd_kernels.token_logprobs import TokenLogprobsFunction
from uniopd_kernels.token_logprobs import token_logprobs
from uniopd_kernels.token_logprobs import token_logprobs_torch
from uniopd_kernels.utils import can_run_triton

__all__ = [
    "AdvantageOutput",
    "LinearTokenLogprobsFunction",
    "TokenLogprobsFunction",
    "can_run_triton",
    "linear_token_logprobs",
    "token_logprobs",
    "token_logprobs_torch",
    "uniopd_advantages",
]
