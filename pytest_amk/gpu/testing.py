"""Programs and comparisons for testing the GPU VM (tests/test_gpu_vm.py, tools/gpu_check.py).

Lowered programs of random small Llama shapes and schedules, hand-built programs
(argmax ties, fault injection), random weights, and a step-by-step comparison of
the GPU against the reference VM. torch is imported inside functions.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from pytest_amk import ir


def exact_device() -> tuple[Any, str]:
    """(DeviceInfo, "") of the GPU, with TF32 off so torch's fp32 matmuls are exact enough to
    compare tokens with the megakernel; (None, reason) when no GPU VM can run here."""
    import torch

    from pytest_amk import gpu

    ok, why = gpu.available()
    if not ok:
        return None, why
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return gpu.device_info(), ""


def knobs(**overrides: Any) -> dict[str, Any]:
    """The default schedule knobs with overrides (``tiling__gemv__n_tile`` for dotted names)."""
    from pytest_amk.schedule import KNOBS

    k = {name: knob.default for name, knob in KNOBS.items()}
    for name, value in overrides.items():
        name = name.replace("__", ".")
        if name not in k:
            raise KeyError(f"unknown knob {name!r}")
        k[name] = value
    return k


def lowered(cfg: Any, dtype: str = "bf16", max_seq: int = 64, target: str = "h100", **kn: Any) -> ir.Program:
    """Lower a model config (a LlamaConfig or a preset name) with the given knobs."""
    from pytest_amk.lower import lower
    from pytest_amk.models import config_for

    if isinstance(cfg, str):
        cfg = config_for(cfg)
    return lower(cfg, ir.get_target(target), knobs(**kn), dtype, max_seq)


def random_case(seed: int) -> tuple[Any, dict[str, Any], str, int]:
    """A random small (config, knobs, dtype, max_seq): shapes, tilings, SM counts, fusions."""
    from pytest_amk.models.config import LlamaConfig

    rng = random.Random(seed)
    head_dim = rng.choice([16, 32, 64, 128])
    kv_heads = rng.choice([1, 2, 4])
    heads = kv_heads * rng.choice([1, 2, 4])
    hidden = rng.choice([64, 100, 128, 200, 256])  # 100 and 200: rows not a 16-byte multiple
    cfg = LlamaConfig(hidden=hidden, layers=rng.choice([1, 2]), heads=heads, kv_heads=kv_heads,
                      head_dim=head_dim, ffn=rng.choice([96, 128, 256, 344]),
                      vocab=rng.choice([97, 256, 1000]), tied=rng.random() < 0.5)
    fusions = [f for f in ([["rmsnorm", "gemv"]], [["gemv", "residual_add"]], [["gemv", "silu_mul"]])
               if rng.random() < 0.6]
    kn = dict(
        sm_count=rng.choice([1, 2, 3, 8, 17, 64, 0]),
        sm_assignment=rng.choice(["round_robin", "balanced"]),
        pipelining_depth=rng.choice([1, 2, 4, 8]),
        threads_per_block=rng.choice([128, 256, 512]),
        tiling__gemv__n_tile=rng.choice([0, 8, 16, 64]),
        tiling__lm_head__n_tile=rng.choice([0, 64, 256]),
        tiling__attention__kv_block=rng.choice([8, 16, 64]),
        tiling__attention__combine_heads=rng.choice([d for d in (1, 2, 4) if heads % d == 0]),
        fusion=[f for group in fusions for f in group],
    )
    dtype = rng.choice(["fp32", "fp16", "bf16"])
    # Within the VM's register cap, which the validator enforces (fp32 holds fewer loads in flight).
    kn["pipelining_depth"] = min(kn["pipelining_depth"], ir.max_pipelining_depth(kn["threads_per_block"], dtype))
    return cfg, kn, dtype, rng.choice([16, 40, 64])


def model_config(program: ir.Program) -> Any:
    from pytest_amk.models.config import LlamaConfig

    return LlamaConfig(**program.meta["model"])


def random_weights(program: ir.Program, seed: int = 0, device: str = "cpu") -> dict[str, Any]:
    """Weights by buffer name: matrices N(0, 1/cols), norm vectors 1 + N(0, 0.01), the rope table."""
    import torch

    from pytest_amk.models.llama import rope_table

    gen = torch.Generator(device=device).manual_seed(seed)
    out: dict[str, Any] = {}
    for b in program.buffers:
        if b.kind is not ir.BufferKind.WEIGHT:
            continue
        if b.name == "rope":
            out[b.name] = rope_table(model_config(program), int(program.meta["max_seq"])).to(device)
        elif len(b.shape) == 1:
            out[b.name] = (1.0 + 0.1 * torch.randn(b.shape, generator=gen, device=device)).to(b.dtype.torch())
        else:
            cols = b.shape[-1]
            out[b.name] = (torch.randn(b.shape, generator=gen, device=device) / math.sqrt(cols)).to(b.dtype.torch())
    return out


@dataclass
class StepResult:
    pos: int
    token: int
    ok: bool
    max_abs_err: float
    tolerance: float
    gpu_next: int | None
    ref_next: int | None
    message: str
    buffer_errs: dict[str, float] = field(default_factory=dict)


def compare_with_refvm(program: ir.Program, weights: dict[str, Any], steps: int = 2, token: int = 1,
                       ref_device: str = "cpu", **runner_kw: Any) -> list[StepResult]:
    """Run ``steps`` decode steps on the GPU and in the reference VM, feeding the reference's
    next token; compare the logits (oracle tolerance), next_token and every KV/activation/output
    buffer (max abs error recorded per buffer after each step)."""
    import torch

    from pytest_amk import refvm
    from pytest_amk.gpu.runtime import GpuRunner, device_info
    from pytest_amk.oracle import compare_logits

    dev = f"cuda:{device_info().index}"
    dtype = str(program.meta["dtype"])
    ref = refvm.alloc_buffers(program, {k: v.to(ref_device) for k, v in weights.items()}, ref_device)
    gpu = refvm.alloc_buffers(program, {k: v.to(dev) for k, v in weights.items()}, dev)
    runner = GpuRunner(program, gpu, **runner_kw)
    nt_id = program.buffer("next_token").id
    results = []
    for pos in range(steps):
        want = refvm.run_step(program, ref, token, pos)
        got = runner.run_step(token, pos).cpu()
        cmp = compare_logits(got, want.cpu(), dtype, f"GPU vs refvm, position {pos}")
        gpu_next, ref_next = runner.next_token(), int(ref[nt_id][0])
        ok = cmp.ok and gpu_next == int(got.argmax())
        msg = cmp.message
        if gpu_next != int(got.argmax()):
            msg += f"; GPU next_token {gpu_next} != argmax of its logits {int(got.argmax())}"
        errs = {}
        for b in program.buffers:
            if b.kind is ir.BufferKind.WEIGHT or b.kind is ir.BufferKind.INPUT:
                continue
            a, r = gpu[b.id].double().cpu(), ref[b.id].double().cpu()
            both_nan = torch.isnan(a) & torch.isnan(r)  # poisoned activations nobody wrote in either
            d = (a - r).abs().masked_fill(both_nan, 0.0)
            errs[b.name] = float(d.max()) if d.numel() else 0.0
        results.append(StepResult(pos, token, ok, cmp.max_abs_err, cmp.tolerance, gpu_next, ref_next, msg, errs))
        token = ref_next
    return results


# -- hand-built programs ---------------------------------------------------------

def nop_program(tasks: list[tuple[int, list[tuple[int, int]], int | None]], num_counters: int,
                num_sms: int | None = None) -> ir.Program:
    """NOP tasks (sm, waits, signal) in queue order: for fault injection (no buffers)."""
    ts = [ir.Task(i, "NOP", sm, [], [], [ir.Wait(c, th) for c, th in waits], sig, {})
          for i, (sm, waits, sig) in enumerate(tasks)]
    n = num_sms if num_sms is not None else 1 + max(t.sm for t in ts)
    meta = {"target": "h100", "dtype": "bf16", "num_sms": n, "threads_per_block": 256, "pipelining_depth": 2}
    return ir.Program([], [ir.Counter(i, f"c{i}") for i in range(num_counters)], ts, meta)


def unsatisfiable_wait_program() -> ir.Program:
    """Task 1 (SM 0) waits for counter 0 >= 5, which only task 0 (SM 1) ever signals."""
    return nop_program([(1, [], 0), (0, [(0, 5)], None)], 1)


def cyclic_program() -> ir.Program:
    """A cycle across queues (SM 0 waits on SM 1 and vice versa) and within a queue (SM 2)."""
    return nop_program([(0, [(1, 1)], 0), (1, [(0, 1)], 1), (2, [(2, 1)], None), (2, [], 2)], 3)


def argmax_tie_program(dtype: str = "bf16", rows: int = 300, k: int = 64, tile: int = 37,
                       num_sms: int = 4) -> tuple[ir.Program, dict[str, Any]]:
    """LM_HEAD tiles over a weight whose rows repeat (equal logits) + ARGMAX: ties must go to
    the smallest row index, within a tile and across tiles."""
    import torch

    dt = ir.DType(dtype)
    W, A, F32, I32 = ir.BufferKind.WEIGHT, ir.BufferKind.ACTIVATION, ir.DType.FP32, ir.DType.INT32
    bufs = [ir.Buffer(0, "x", W, dt, (k,)), ir.Buffer(1, "w", W, dt, (rows, k)),
            ir.Buffer(2, "norm", W, dt, (k,)), ir.Buffer(3, "logits", ir.BufferKind.OUTPUT, F32, (rows,)),
            ir.Buffer(4, "amax", A, F32, ((rows + tile - 1) // tile, 2)),
            ir.Buffer(5, "next_token", ir.BufferKind.OUTPUT, I32, (1,))]
    n_tiles = (rows + tile - 1) // tile
    tasks = []
    for t in range(n_tiles):
        lo, hi = t * tile, min(rows, (t + 1) * tile)
        tasks.append(ir.Task(t, "LM_HEAD", t % num_sms, [ir.Region(0, 0, k), ir.Region(1, lo * k, hi * k)],
                             [ir.Region(3, lo, hi), ir.Region(4, 2 * t, 2 * t + 2)], [], 0,
                             dict(inp=0, weight=1, out=3, n_lo=lo, n_hi=hi, k=k, norm_weight=2, eps=1e-5,
                                  amax=4, tile=t)))
    tasks.append(ir.Task(n_tiles, "ARGMAX", 0, [ir.Region(4, 0, 2 * n_tiles)], [ir.Region(5, 0, 1)],
                         [ir.Wait(0, n_tiles)], None, dict(amax=4, n_tiles=n_tiles, out=5)))
    meta = {"target": "h100", "dtype": dtype, "num_sms": num_sms, "threads_per_block": 128,
            "pipelining_depth": 2, "max_seq": 1}
    prog = ir.Program(bufs, [ir.Counter(0, "lm_head")], tasks, meta)
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(8, k, generator=gen)
    w = base[torch.arange(rows) % 8]  # row r repeats row r % 8: the max appears in every tile
    weights = {"x": torch.randn(k, generator=gen).to(dt.torch()), "w": w.to(dt.torch()),
               "norm": torch.ones(k).to(dt.torch())}
    return prog, weights
