"""The FA2 kernels compile for Hopper (sm_90) with the installed Triton, without a GPU: CI's interpreter runs the
kernels' logic, this checks that the same source also lowers to GPU code (wgmma tensor-core instructions).

Run by the test below in a child process without TRITON_INTERPRET (the interpreter replaces the jit functions);
``python tests/test_compile_sm90.py [all]`` compiles and prints the result.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _types(name, bias_type):
    if name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
        return "*bf16"
    if name == "Bias":
        return "*i1" if bias_type == 2 else "*bf16"
    if name in ("LSE", "Delta", "Alibi", "DBias"):
        return "*fp32"
    if name == "Rng":
        return "*i64"
    if name in ("CuQ", "CuK"):
        return "*i32"
    if name in ("scale_log2", "sm_scale", "softcap", "dropout_p"):
        return "fp32"
    return "i32"


BASE = dict(HEAD_DIM=128, BLOCK_D=128, IS_VARLEN=False, WINDOWED=True, HAS_SOFTCAP=False, HAS_ALIBI=False,
            BIAS_TYPE=0, HAS_DROPOUT=False, DOT_PREC="tf32")
ALL = dict(IS_VARLEN=True, HAS_SOFTCAP=True, HAS_ALIBI=True, HAS_DROPOUT=True, BIAS_TYPE=1)


def compile_all(features):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hf_flash.kernels import attention as A

    def build(fn, consts):
        sig, cx = {}, {}
        for i, n in enumerate(fn.arg_names):
            if n in consts:
                sig[n], cx[(i,)] = "constexpr", consts[n]
            else:
                sig[n] = _types(n, consts.get("BIAS_TYPE", 0))
        src = ASTSource(fn=fn, signature=sig, constexprs=cx, attrs={})
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8, num_stages=3))

    fwd = build(A._fwd_kernel, dict(BASE, BLOCK_M=128, BLOCK_N=64, REVERSE_M=True, **features))
    assert "wgmma.mma_async" in fwd.asm["ptx"], "the forward does not use Hopper's wgmma"
    bwd = dict(BASE, BLOCK_M=64, BLOCK_N=128, **features)
    build(A._bwd_dkdv_kernel, dict(bwd, FUSE_DQ=True))  # the default: dQ with atomics
    build(A._bwd_dkdv_kernel, dict(bwd, FUSE_DQ=False))
    build(A._bwd_dq_kernel, dict(bwd, DBIAS_MODE=2 if features else 0))
    return "compiled fwd, dkdv (fused dq and not), dq for sm_90"


def compile_gluon(causal: bool):
    """The warp-specialised Gluon forward and backward (kernels/gluon_attention.py) and split-KV decode kernel
    (kernels/gluon_decode.py) with the signatures their launchers give them; the causal build is the varlen one
    (packed sequences), the other dense."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from hf_flash.kernels import gluon_attention as G

    lay = repr(G.smem_layout())
    desc = "tensordesc<bf16[1, {}, 1, %d],%s>" % (G.HEAD_DIM, lay)
    sig = {"q_desc": desc.format(G.BLOCK_M), "k_desc": desc.format(G.BLOCK_N), "v_desc": desc.format(G.BLOCK_N),
           "O": "*bf16", "LSE": "*fp32", "CuQ": "*i32", "CuK": "*i32", "stride_ob": "i64", "stride_om": "i64",
           "stride_oh": "i64", "stride_lb": "i64", "stride_lh": "i64", "nheads": "i32", "group": "i32",
           "seqlen_q": "i32", "seqlen_k": "i32", "qk_scale": "fp32"}
    consts = dict(HEAD_D=G.HEAD_DIM, BM=G.BLOCK_M, BN=G.BLOCK_N, NSTAGES=G.STAGES, CAUSAL=causal, VARLEN=causal,
                  CONSUMER_REGS=G.REGS[0], PRODUCER_REGS=G.REGS[1])
    sig.update({n: "constexpr" for n in consts})

    def ptx_of(fn, signature, constants, what):
        kernel = triton.compile(GluonASTSource(fn, signature, constants, {}), target=GPUTarget("cuda", 90, 32),
                                options=dict(num_warps=4))
        ptx = kernel.asm["ptx"]
        assert "wgmma.mma_async" in ptx and "setmaxnreg" in ptx and "cp.async.bulk.tensor.4d" in ptx, \
            f"the Gluon {what} lost its wgmma / warp specialisation / 4-D TMA loads"
        return ptx

    ptx_of(G._fwd_ws_kernel, sig, consts, "forward")
    bsig = {"q_desc": desc.format(G.BWD_BLOCK_M), "k_desc": desc.format(G.BWD_BLOCK_N),
            "v_desc": desc.format(G.BWD_BLOCK_N), "do_desc": desc.format(G.BWD_BLOCK_M), "LSE": "*fp32",
            "Delta": "*fp32", "DQ": "*fp32", "DK": "*bf16", "DV": "*bf16", "CuQ": "*i32", "CuK": "*i32",
            "nheads": "i32", "nheads_k": "i32", "group": "i32", "split": "i32", "seqlen_q": "i32", "seqlen_k": "i32",
            "scale_log2": "fp32", "sm_scale": "fp32"}
    bsig.update({n: "i64" for n in ("stride_lb", "stride_lh", "stride_dqb", "stride_dqm", "stride_dqh", "stride_dks",
                                    "stride_dkb", "stride_dkn", "stride_dkh", "stride_dvs", "stride_dvb",
                                    "stride_dvn", "stride_dvh")})
    bconsts = dict(HEAD_D=G.HEAD_DIM, BM=G.BWD_BLOCK_M, BN=G.BWD_BLOCK_N, NSTAGES=G.BWD_STAGES, CAUSAL=causal,
                   VARLEN=causal, CONSUMER_REGS=G.REGS[0], PRODUCER_REGS=G.REGS[1], WRITER_REGS=G.BWD_WRITER_REGS)
    bsig.update({n: "constexpr" for n in bconsts})
    ptx = ptx_of(G._bwd_ws_kernel, bsig, bconsts, "backward")
    assert "red.global" in ptx or "atom.global" in ptx, "the Gluon backward does not add dQ with atomics"

    # the split-KV decode kernel (kernels/gluon_decode.py): the causal build takes every optional input, 32 query
    # rows and writes partials; the other 8 rows and writes the output itself
    from hf_flash.kernels import gluon_decode as GD

    ddesc = "tensordesc<bf16[1, %d, 1, %d],%s>" % (GD.BLOCK_N, GD.HEAD_DIM, repr(GD.smem_layout()))
    dsig = {"k_desc": ddesc, "v_desc": ddesc, "Q": "*bf16", "OUT": "*bf16", "LSE": "*fp32", "O_PART": "*fp32",
            "LSE_PART": "*fp32", "SEQLENS_K": "*i32", "LEFTPAD": "*i32", "BATCH_IDX": "*i32"}
    dsig.update({n: "i32" for n in ("stride_qb", "stride_qt", "stride_qh", "stride_ob", "stride_ot", "stride_oh",
                                    "stride_lb", "stride_lh", "stride_lt", "nheads_k", "group", "seqlen_q",
                                    "capacity", "batch_cache", "chunk", "rows_pad")})
    dsig["qk_scale"] = "fp32"
    dconsts = dict(HAS_SEQLENS=causal, HAS_LEFTPAD=causal, HAS_BATCH_IDX=causal, CAUSAL=causal, SPLIT=causal,
                   HEAD_D=GD.HEAD_DIM, BN=GD.BLOCK_N, NSTAGES=GD.STAGES, PRODUCER_REGS=GD.REGS,
                   NQ=32 if causal else 8)
    dsig.update({n: "constexpr" for n in dconsts})
    ptx_of(GD._decode_kernel, dsig, dconsts, "split-KV decode kernel")
    return "compiled the Gluon forward, backward and decode kernels for sm_90"


@pytest.mark.parametrize("causal", [True, False])
def test_gluon_kernels_compile_for_sm90(causal):
    """Gluon has no CPU interpreter: this is what CI checks of the Hopper forward, backward and decode kernels (the
    GPU tests run them), and its API moves between Triton releases (3.6 on the GPU image, 3.9 in CI)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    from conftest import subprocess_env

    proc = subprocess.run([sys.executable, __file__, "gluon", str(int(causal))], env=subprocess_env(env),
                          capture_output=True, text=True, timeout=600)
    if "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("this Triton has no ptxas for the platform")
    ok = proc.returncode == 0 and "compiled the Gluon forward, backward and decode kernels for sm_90" in proc.stdout
    assert ok, proc.stderr[-3000:]


@pytest.mark.parametrize("features", ["plain", "all"])
def test_fa2_kernels_compile_for_sm90(features):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    from conftest import subprocess_env

    proc = subprocess.run([sys.executable, __file__, features], env=subprocess_env(env), capture_output=True, text=True,
                          timeout=600)
    if "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("this Triton has no ptxas for the platform")
    ok = proc.returncode == 0 and "compiled fwd, dkdv (fused dq and not), dq for sm_90" in proc.stdout
    assert ok, proc.stderr[-3000:]


if __name__ == "__main__":
    if sys.argv[1:2] == ["gluon"]:
        print(compile_gluon(sys.argv[2:] != ["0"]))
    else:
        print(compile_all(ALL if sys.argv[1:] == ["all"] else {}))
