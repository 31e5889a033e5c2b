"""Reading a compiled program's HLO text (`compiled.as_text()`): its matrix FLOPs, loops counted per iteration,
the kernels and library calls it makes (TPU Mosaic kernels; GPU cuBLAS, cuDNN and Triton gemm fusions), its
collectives, and the dtypes of its products. Nothing here compiles; the text is enough."""
from __future__ import annotations

import math
import re

_SHAPE = re.compile(r"\b(pred|s4|s8|s16|s32|s64|u4|u8|u16|u32|u64|f8e4m3fn|f8e5m2|bf16|f16|f32|f64|c64|c128)"
                    r"\[([\d,]*)\]")
_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
          "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# FLOPs per (query row × key row × head-dim column) of each splash kernel, for the matmuls it runs on the MXU:
# forward q·kᵀ and p·v; dq recomputes q·kᵀ, then dp = do·vᵀ and dq = ds·k; dkv recomputes q·kᵀ, then dp,
# dv = pᵀ·do and dk = dsᵀ·q. Two FLOPs per multiply-add.
_SPLASH_FLOPS = {"fwd": 4, "dq": 6, "dkv": 8}


def _shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in _SHAPE.findall(text)]


def _nbytes(shapes) -> int:
    return int(sum(_BYTES[t] * math.prod(s) for t, s in shapes))


def _instructions(hlo: str):
    """(name, result type text, opcode, line) of every HLO instruction."""
    pattern = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\(")
    for line in hlo.splitlines():
        m = pattern.match(line)
        if m:
            yield m.group(1), m.group(2), m.group(3), line


def mosaic_kernels(hlo: str) -> dict[str, int]:
    """The compiled program's Mosaic kernels (`tpu_custom_call`s), counted by name."""
    counts: dict[str, int] = {}
    for name, _, op, line in _instructions(hlo):
        if op == "custom-call" and 'custom_call_target="tpu_custom_call"' in line:
            base = re.sub(r"\.\d+$", "", name)
            counts[base] = counts.get(base, 0) + 1
    return dict(sorted(counts.items()))


def _kernel_flops(result: str, name: str) -> float:
    kind = next((k for k in _SPLASH_FLOPS if f"splash_mha_{k}" in name), None)
    if kind is None:
        return 0.0
    out = max((s for t, s in _shapes(result) if len(s) >= 3), key=math.prod)
    return float(_SPLASH_FLOPS[kind] * math.prod(out[:-1]) * out[-2] * out[-1])


# A cuDNN convolution custom call is described as its forward convolution (window, dim_labels); which of its
# operands and result are that convolution's input x, kernel w and output y depends on the kind.
_CUDNN_CONV = {"__cudnn$convForward": ("op0", "op1", "res"), "__cudnn$convBiasActivationForward": ("op0", "op1", "res"),
               "__cudnn$convBackwardInput": ("res", "op1", "op0"), "__cudnn$convBackwardFilter": ("op0", "res", "op1")}


def _target(line: str) -> str | None:
    m = re.search(r'custom_call_target="([^"]+)"', line)
    return m.group(1) if m else None


def _gpu_call_flops(line: str, target: str, result: str, operands: list, shapes: dict) -> float:
    """FLOPs of a GPU library call the cost model counts as nothing (−1), from its shapes: a cuDNN convolution
    as its forward convolution (`_conv_flops`); a cuBLAS gemm as 2 × its result × the contracted size; cuDNN
    fused attention as 4·B·H·Lq·Lk·D forward (q·kᵀ and p·v) and 10·B·H·Lq·Lk·D backward (q·kᵀ
    recomputed, then dP = dO·vᵀ, dV = Pᵀ·dO, dQ = dS·k, dK = dSᵀ·q: FlashAttention-2's count)."""
    out = next((s for _, s in _shapes(result) if s), None)
    ops = [shapes.get(o) for o in operands]
    if target in _CUDNN_CONV:
        where = {"res": out, "op0": ops[0] if ops else None, "op1": ops[1] if len(ops) > 1 else None}
        x, w, y = (where[k] for k in _CUDNN_CONV[target])
        return _conv_flops(line, y, x, w) if None not in (x, w, y) else 0.0
    if target.startswith("__cublas$"):
        dims = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', line)
        if dims is None or out is None or not ops or ops[0] is None:
            return 0.0
        inner = math.prod(ops[0][int(d)] for d in re.findall(r"\d+", dims.group(1)))
        return 2.0 * math.prod(out) * inner
    if target.startswith("__cudnn$fmha"):
        m = re.search(r'"intermediate_tensor_shape":\{"element_type":"\w+","dimensions":\[([^\]]*)\]',
                      line.replace(" ", ""))
        if m is None or not ops or ops[0] is None:
            return 0.0
        b, h, lq, lk = (int(d) for d in re.findall(r"\d+", m.group(1)))
        return (10.0 if "Backward" in target else 4.0) * b * h * lq * lk * ops[0][-1]
    return 0.0


def custom_calls(hlo: str) -> dict[str, int]:
    """The compiled program's library calls and kernels counted by target: custom calls (cuBLAS `__cublas$…`,
    cuDNN `__cudnn$conv…` and `__cudnn$fmha…` fused attention, TPU `tpu_custom_call`) and the GPU's custom
    fusions (`__triton_gemm` and its kin: matrix products XLA emits itself through Triton)."""
    counts: dict[str, int] = {}
    for _, _, op, line in _instructions(hlo):
        key = _target(line) if op == "custom-call" else None
        if op == "fusion" and "kind=kCustom" in line:
            kind = re.search(r'"fusion_backend_config":\{"kind":"([^"]+)"', line.replace(" ", ""))
            key = kind.group(1) if kind else None
        if key:
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _taps(n: int, m: int, k: int, stride: int, lo: int, lhs_dilate: int, rhs_dilate: int) -> int:
    """Σ over the m output positions of one spatial dimension of the window taps that land on one of the n
    input elements (not on padding, not between dilated elements)."""
    last = (n - 1) * lhs_dilate
    total = 0
    for o in range(m):
        for j in range(k):
            p = o * stride - lo + j * rhs_dilate
            total += 0 <= p <= last and p % lhs_dilate == 0
    return total


def _conv_flops(line: str, result, lhs, rhs) -> float:
    """2 × the multiply-adds of one convolution: each output element sums the kernel's input features over
    the window taps that hit the input (padding and dilation holes excluded, as the compiler counts them)."""
    labels = re.search(r"dim_labels=([\w]+)_([\w]+)->([\w]+)", line)
    if not labels or lhs is None or rhs is None:
        return 0.0
    lhs_l, rhs_l, out_l = labels.groups()
    window = dict(re.findall(r"(\w+)=([\d_x\-]+)", (re.search(r"window=\{([^}]*)\}", line) or [None, ""])[1]))
    spatial = sorted(c for c in out_l if c.isdigit())

    def per_dim(key, default):
        values = window.get(key)
        return [default] * len(spatial) if values is None else values.split("x")

    size, stride = per_dim("size", "1"), per_dim("stride", "1")
    pad, ld, rd = per_dim("pad", "0_0"), per_dim("lhs_dilate", "1"), per_dim("rhs_dilate", "1")
    taps = 1
    for d, c in enumerate(spatial):
        taps *= _taps(lhs[lhs_l.index(c)], result[out_l.index(c)], int(size[d]), int(stride[d]),
                      int(pad[d].split("_")[0]), int(ld[d]), int(rd[d]))
    return 2.0 * result[out_l.index("b")] * result[out_l.index("f")] * rhs[rhs_l.index("i")] * taps


def _computations(hlo: str) -> tuple[dict[str, list[str]], str | None]:
    """{computation name: its instruction lines} and the entry computation's name."""
    comps: dict[str, list[str]] = {}
    entry = current = None
    for line in hlo.splitlines():
        head = re.match(r"^(ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$", line)
        if head:
            current = head.group(2)
            comps[current] = []
            entry = current if head.group(1) else entry
        elif current is None:
            continue
        elif line.rstrip() == "}":
            current = None
        elif re.match(r"^\s+(ROOT\s+)?%", line) or not comps[current]:
            comps[current].append(line)
        else:  # an attribute printed over several lines (a Mosaic kernel's configuration)
            comps[current][-1] += " " + line.strip()
    return comps, entry


def _trip_count(condition: list[str]) -> int | None:
    """The trip count of a counted loop (`i < N` on a counter from 0, as lax.scan and fori_loop compile)."""
    constants = dict(re.findall(r"%([\w.\-]+) = s32\[\]\S* constant\((\d+)\)", "\n".join(condition)))
    for line in condition:
        m = re.search(r"compare\(%[\w.\-]+, %([\w.\-]+)\), direction=LT", line)
        if m and m.group(1) in constants:
            return int(constants[m.group(1)])
    return None


def program_flops(hlo: str) -> dict[str, float]:
    """The compiled program's matrix FLOPs (convolutions and dots, which is how a TPU program holds its
    matmuls and a GPU one its Triton gemms) and the FLOPs of its kernels and library calls (TPU splash kernels;
    GPU cuBLAS gemms, cuDNN convolutions and fused attention), each counted once per instruction (`static`,
    as the compiler's cost analysis counts a loop's body) and once per execution (`executed`: a counted loop's body times its trip
    count). `unknown_loops` counts loops whose trip count could not be read (counted once)."""
    comps, entry = _computations(hlo)
    shapes: dict[str, tuple[int, ...]] = {}
    for lines in comps.values():
        for line in lines:
            m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\]", line)
            if m:
                shapes[m.group(1)] = tuple(int(d) for d in m.group(3).split(",") if d)
    unknown = set()
    memo: dict[tuple[str, bool], tuple[float, float]] = {}

    def flops(comp: str, executed: bool) -> tuple[float, float]:
        if (comp, executed) in memo:
            return memo[comp, executed]
        memo[comp, executed] = (0.0, 0.0)  # recursion guard
        matmul = kernel = 0.0
        for name, result, op, line in _instructions("\n".join(comps.get(comp, []))):
            operands = re.findall(r"%([\w.\-]+)", line[line.index(op + "(") + len(op) + 1:].split(")")[0])
            if op == "convolution" and len(operands) >= 2:
                matmul += _conv_flops(line, shapes.get(name), shapes.get(operands[0]), shapes.get(operands[1]))
            elif op == "dot" and operands:
                dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
                lhs = shapes.get(operands[0])
                if dims and lhs is not None and shapes.get(name) is not None:
                    inner = math.prod(lhs[int(d)] for d in dims.group(1).split(",") if d)
                    matmul += 2.0 * math.prod(shapes[name]) * inner
            elif op == "custom-call" and 'custom_call_target="tpu_custom_call"' in line:
                kernel += _kernel_flops(result, name)
            elif op == "custom-call":
                kernel += _gpu_call_flops(line, _target(line), result, operands, shapes)
            elif op == "while":
                body = re.search(r"body=%([\w.\-]+)", line).group(1)
                cond = re.search(r"condition=%([\w.\-]+)", line).group(1)
                known = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)  # the GPU compiler's note
                trips = (int(known.group(1)) if known else _trip_count(comps.get(cond, []))) if executed else 1
                if trips is None:
                    unknown.add(name)
                    trips = 1
                m, k = flops(body, executed)
                matmul, kernel = matmul + trips * m, kernel + trips * k
            else:
                called = re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", line)
                branches = re.search(r"branch_computations=\{([^}]*)\}", line)
                for c in called:
                    m, k = flops(c, executed)
                    matmul, kernel = matmul + m, kernel + k
                if branches:  # a conditional runs one branch: the costliest, for a bound that holds
                    costs = [flops(c, executed) for c in re.findall(r"%([\w.\-]+)", branches.group(1))]
                    m, k = max(costs, key=sum)
                    matmul, kernel = matmul + m, kernel + k
        memo[comp, executed] = (matmul, kernel)
        return matmul, kernel

    if entry is None:
        return {"static_matmul": 0.0, "static_kernels": 0.0, "executed_matmul": 0.0, "executed_kernels": 0.0,
                "unknown_loops": 0}
    (sm, sk), (em, ek) = flops(entry, False), flops(entry, True)
    return {"static_matmul": sm, "static_kernels": sk, "executed_matmul": em, "executed_kernels": ek,
            "unknown_loops": len(unknown)}


def collectives(hlo: str) -> dict[str, dict[str, int]]:
    """{kind: {"count", "bytes"}} of the compiled program's collectives, bytes being the size of what each
    produces on one chip. Static counts: one inside a loop body counts once. Each collective counts once, by
    its channel id: the TPU compiler runs an asynchronous one from a start fusion through
    `async_collective_fusion`s (carried on beside the compute it overlaps with) to a done fusion, each holding
    a copy of it. A reduce-scatter is a custom fusion of an all-reduce and the slice each chip keeps
    (`calls=%all-reduce-scatter…`): it counts as a reduce-scatter, its inner all-reduce not at all."""
    comps, _ = _computations(hlo)
    fused = {name for name in comps if name.startswith("all-reduce-scatter")}
    inner = {line for name in fused for line in comps[name]}
    out = {k: {"count": 0, "bytes": 0} for k in _COLLECTIVES}
    seen = set()
    for n, (_, result, op, line) in enumerate(_instructions(hlo)):
        called = re.search(r"calls=%([\w.\-]+)", line) if op == "fusion" else None
        kind = "reduce-scatter" if called and called.group(1) in fused else op.removesuffix("-start")
        if kind not in out or op.endswith("-done") or line in inner:
            continue
        channel = re.search(r"channel_id=(\d+)", line)
        key = (kind, channel.group(1)) if channel else n
        if key in seen:
            continue
        seen.add(key)
        shapes = [s for s in _shapes(result) if s[1]]  # less the scalar contexts of an async start
        if op.endswith("-start") and kind in ("all-gather", "collective-permute") and len(shapes) >= 2:
            shapes = shapes[len(shapes) // 2:]  # (operands, results): the results
        out[kind]["count"] += 1
        out[kind]["bytes"] += _nbytes(shapes)
    return out


def dtype_census(hlo: str) -> dict[str, int]:
    """The compiled program's convolutions and matrix products (inside fusions too; a TPU program has its dots
    as convolutions; a GPU one calls cuDNN and cuBLAS, keyed by target, operands counted to the first two, a
    call's scratch bytes left out) counted by operand and result dtypes, "bf16,bf16->f32": float32 operands
    in a bfloat16 step run at a fraction of the matrix units' rate, or show a cast that went missing."""
    types = {}
    found = []
    for name, result, op, line in _instructions(hlo):
        types[name] = [t for t, _ in _shapes(result)]
        target = _target(line) if op == "custom-call" else None
        if op in ("convolution", "dot") or (target or "").startswith(("__cudnn$conv", "__cublas$")):
            args = line[line.index(op + "(") + len(op) + 1:].split(")")[0]
            found.append((target or op, re.findall(r"%([\w.\-]+)", args)[:2], [t for t in types[name] if t != "u8"]))
    out: dict[str, int] = {}
    for op, operands, result in found:
        key = f"{op} {','.join(types.get(o, ['?'])[0] for o in operands)}->{','.join(result)}"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


