"""The engine on CUDA (run on the device, skipped in CI): CUDA-graph decode is token-for-token the
same as eager decode, and a quantized model on the GPU agrees with the CPU reference path."""
import pytest
import torch

from lowbit.engine.generate import Generation
from lowbit.engine.kernels import registry
from lowbit.engine.kv_cache import create_cache
from lowbit.engine.load import load_model
from lowbit.quant.config import QuantConfig

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPT = "The history of the city of Sydney begins with"


@pytest.mark.parametrize("weights", [None, QuantConfig(weight_bits=4, group_size=128),
                                     QuantConfig(weight_bits=8, group_size=None)],
                         ids=["16", "int4", "int8"])
def test_graph_decode_equals_eager(weights):
    loaded = load_model(None, device="cuda", quant=weights)
    ids = loaded.tokenizer.encode(PROMPT)
    runs = []
    for graph in (True, False):
        gen = Generation(loaded.model, ids, max_new_tokens=48, cuda_graph=graph)
        runs.append(list(gen))
    assert runs[0] == runs[1]


def window_logits(loaded, ids):
    t = ids.shape[1]
    cache = create_cache(16, loaded.config, 1, t, loaded.dtype, loaded.device)
    with torch.inference_mode():
        return loaded.model(ids.to(loaded.device), torch.arange(t, device=loaded.device), cache,
                            kv_len=t).float().cpu()


@pytest.mark.parametrize("bits,group", [(4, 128), (4, 64), (8, None)])
def test_gpu_kernels_agree_with_cpu_reference(tmp_path, bits, group):
    """The same checkpoint (same integers, same fp16 scales) through the Triton kernels in fp16 on
    the GPU and through the torch reference in fp32 on the CPU: only activation precision differs."""
    from lowbit.quant.convert import convert
    from lowbit.quant.text import default_text_path
    ckpt = tmp_path / "ckpt"
    convert(None, ckpt, QuantConfig(weight_bits=bits, group_size=group), progress=False)
    cpu = load_model(ckpt, device="cpu", dtype="fp32")
    gpu = load_model(ckpt, device="cuda", dtype="fp16")
    text = default_text_path().read_text(encoding="utf-8")
    ids = torch.tensor([cpu.tokenizer.encode(text)[:1024]])
    with registry.use_backend("reference"):
        ref = window_logits(cpu, ids)
    got = window_logits(gpu, ids)
    agreement = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    assert agreement >= 0.99, f"top-1 agreement {agreement:.4f}"
    assert "triton" in registry.chosen()["dequant_matmul"]["cuda/gemm"]
