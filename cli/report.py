"""Human-readable renderings of statistics, shared by the commands."""
from __future__ import annotations


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def format_generation_stats(st, label: dict) -> str:
    mem_kind = "peak GPU memory" if st.device.startswith("cuda") else "peak RSS"
    return "\n".join([
        f"[{label['model']} · weights {label['weights']} · {label['dtype']} · {st.device} · "
        f"KV {st.kv_bits}-bit]",
        f"prefill  {st.prompt_tokens} tokens in {st.prefill_s * 1e3:.1f} ms "
        f"({st.prefill_tok_s:.1f} tok/s) · time to first token {st.ttft_s * 1e3:.1f} ms",
        f"decode   {st.new_tokens} tokens · {st.decode_tok_s:.1f} tok/s · stop: {st.stop_reason}",
        f"memory   weights {human_bytes(st.weight_bytes)} · KV {human_bytes(st.kv_bytes_per_token)}"
        f"/token ({human_bytes(st.kv_bytes_allocated)} allocated) · {mem_kind} "
        f"{human_bytes(st.peak_mem_bytes)}",
    ])
