"""What the GPU benchmarks measure a run against: the card's copy bandwidth and dense matmul rate, the bytes and
FLOPs a decode step needs, and the floors they give; NVML utilisation; the prompts every script shares.

Imported by the scripts of this directory (which is on their path when they run), never by asyncbatch.
"""

from __future__ import annotations

import random
import threading

import torch


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read plus bytes written over time)."""
    src = torch.empty(nbytes // 2, dtype=torch.int16, device="cuda").random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / 20
    del src, dst
    return 2 * nbytes / seconds


def dense_matmul_flops(n: int = 8192) -> float:
    """The card's bf16 matmul rate in FLOP/s, from one large square product (cuBLAS at its best shape)."""
    a, b = (torch.randn(n, n, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    end.synchronize()
    return 2 * n**3 / (start.elapsed_time(end) / 1e3 / 20)


def step_floor_s(batch: int, ctx: float, weight_b: float, kv_b_per_token: float, flops_per_token: float,
                 attention_flops_per_position: float, bandwidth: float, flops: float) -> float:
    """Seconds a decode step cannot go below: the products take their weights' bytes over the bandwidth or their
    FLOPs over the dense rate, whichever is longer, then attention its K/V bytes or FLOPs. The byte roofline alone
    is this floor at small batches and undershoots it once the products are compute-bound."""
    products = max(weight_b / bandwidth, batch * flops_per_token / flops)
    attention = max(batch * ctx * kv_b_per_token / bandwidth, batch * ctx * attention_flops_per_position / flops)
    return products + attention


def product_flops_per_token(model) -> int:
    """2 x the weights a token multiplies: every matrix but the input embedding (its B rows are a gather)."""
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters() if p.dim() == 2 and p.data_ptr() != emb.data_ptr())
    return 2 * (total + (out.numel() if out.data_ptr() == emb.data_ptr() else 0))


def query_heads(model) -> int:
    config = getattr(model.config, "text_config", None) or model.config
    return config.num_attention_heads


class NvmlSampler:
    """Mean NVML `utilization.gpu` sampled every 50 ms while active (None where NVML is missing)."""

    def __init__(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            self._nvml = pynvml
        except Exception:
            self._nvml = None
        self.samples: list[int] = []

    def __enter__(self) -> NvmlSampler:
        self.samples = []
        self._stop = threading.Event()
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._nvml is not None:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(n)]


def weight_bytes(model) -> int:
    """Bytes a decode step reads from weights: all parameters except the input embedding (only B rows of it)."""
    emb = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    tied = emb.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    return total if tied else total - emb.numel() * emb.element_size()


def kv_bytes_per_token(engine) -> int:
    g = engine.geometry
    return 2 * g["layers"] * g["kv_heads"] * g["head_dim"] * engine.k_cache[0].element_size()
