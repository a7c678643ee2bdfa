# uniopd-mcore on GPU nodes. NVIDIA's PyTorch container brings CUDA, NCCL, apex, Transformer Engine
# and flash-attn built for each other; we add SGLang, Megatron-Core and the project, all pinned.
# No model weights are baked in: mount checkpoints at run time (e.g. -v /models:/models).
#
#   docker build -t uniopd-mcore .
#   docker run --gpus all --ipc=host --net=host -v $PWD/runs:/workspace/uniopd-mcore/runs \
#       -v /models:/models uniopd-mcore uniopd-mcore train --config examples/configs/qwen3_30b_a3b_to_4b.yaml
FROM nvcr.io/nvidia/pytorch:25.09-py3

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    # The container's torch must stay: a dependency that asks for another torch would replace it.
    PIP_CONSTRAINT=/etc/pip-constraints.txt

RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /etc/pip-constraints.txt \
 && python -c "import transformer_engine, flash_attn, apex; print('TE, flash-attn and apex present')"

WORKDIR /workspace/uniopd-mcore
COPY setup.py README.md ./
COPY uniopd_mcore ./uniopd_mcore
COPY kernels ./kernels
COPY examples ./examples
COPY benchmarks ./benchmarks
COPY tests ./tests

# GPU extras: SGLang for rollout engines and teacher servers, Liger for kernel comparisons.
# TE and flash-attn come from the base image, so their extras are not requested here.
RUN pip install "megatron-core==0.16.1" "sglang[srt]==0.5.6" "liger-kernel==0.6.4" \
 && pip install -e ".[test]"

ENTRYPOINT []
CMD ["uniopd-mcore", "--help"]
