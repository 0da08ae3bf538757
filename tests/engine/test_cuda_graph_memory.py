"""CUDA-graph decode leaves nothing behind: generation after generation, the GPU memory in use
after each stays the same (GPU only; the warm-up stream is shared, so cuBLAS keeps one workspace
for it, not one per generation)."""
import dataclasses
import gc

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("weights", [None, "int4"], ids=["bf16", "int4"])
def test_repeated_generations_do_not_grow_gpu_memory(weights):
    from lowbit.engine.generate import Generation
    from lowbit.engine.model_configs import named_config
    from lowbit.engine.random_model import random_model
    from lowbit.quant.config import QuantConfig
    cfg = dataclasses.replace(named_config("llama-3-8b")[1], num_layers=2, vocab_size=4096)
    quant = QuantConfig(weight_bits=4, group_size=128) if weights else None
    model = random_model(cfg, torch.device("cuda"), torch.bfloat16, quant)
    prompt = list(range(1, 33))

    def generate_and_settle() -> int:
        list(Generation(model, prompt, max_new_tokens=8))
        gc.collect()
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    generate_and_settle()  # first use: compiled kernels, grown per-device buffers
    after = [generate_and_settle() for _ in range(3)]
    assert after[1] == after[0] and after[2] == after[0], after
