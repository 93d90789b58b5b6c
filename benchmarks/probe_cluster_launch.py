"""What launching the Gluon split-KV decode kernel in thread-block clusters costs, with the kernel unchanged.

    python benchmarks/probe_cluster_launch.py [OUT_DIR]

Why: merging the splits inside the split kernel, each (sequence, KV head)'s splits being one cluster that meets at
``barrier.cluster`` and merges its partials (no combine kernel), measured slower than the kernel plus its combine
on the H100 (benchmarks/NOTES.md, thirteenth session). This probe separates the cluster launch from the merge: the
kernel of kernels/gluon_decode.py, compiled as usual, is launched through Triton's launcher with the packed
metadata's CTA count set to N (clusters of N consecutive KV heads along the grid's first axis; the kernel uses no
cluster feature), optionally with its dynamic shared memory padded so that one CTA fits per SM. The combine kernel
follows as usual. Times: 32 decode calls (4k, 16k; 32/8 heads) or 4 (64k, 32/32 heads) captured in one CUDA graph,
per call. Also: the combine kernel with 1, 2 or 8 warps instead of 4 (the step's other launch). Writes
probe_cluster_launch.json into OUT_DIR (default: current folder).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402

from hf_flash.kernels import _launch  # noqa: E402
from hf_flash.kernels import decode as D  # noqa: E402
from hf_flash.kernels import gluon_decode as GD  # noqa: E402
from probe_decode import graph_of  # noqa: E402 - benchmarks/, this script's folder

MODE = {"cluster": 1, "smem": 0, "combine_warps": 0}
_COMPILED: dict = {}
_launch_as_usual = _launch.launch


def _launch_in_clusters(fn, grid, args, *, num_warps, num_stages=1, launch_pdl=False):
    if fn is D._combine_kernel and MODE["combine_warps"]:
        num_warps = MODE["combine_warps"]
    if fn is not GD._decode_kernel or MODE["cluster"] == 1 and not MODE["smem"]:
        return _launch_as_usual(fn, grid, args, num_warps=num_warps, num_stages=num_stages, launch_pdl=launch_pdl)
    key = tuple(args[n] for n in ("NQ", "SPLIT", "CAUSAL", "HAS_SEQLENS"))
    kernel = _COMPILED.get(key)
    if kernel is None:
        kernel = _COMPILED[key] = fn.warmup(grid=tuple(grid), **args, num_warps=num_warps, num_stages=num_stages)
    run = kernel.run  # loads the module: sets kernel.function
    n = MODE["cluster"]
    if grid[0] % n:
        raise ValueError(f"{grid[0]} programs along x do not make clusters of {n}")
    meta = tuple(kernel.packed_metadata)
    packed = (meta[0], n, max(meta[2], MODE["smem"]))
    stream = torch._C._cuda_getCurrentRawStream(torch.cuda.current_device())
    run(grid[0] // n, grid[1], 1, stream, kernel.function, packed, None, None, None,
        *[args[name] for name in fn.arg_names])
    return kernel


def main():
    out_dir = next((a for a in sys.argv[1:] if not a.startswith("--")), ".")
    _launch.launch = _launch_in_clusters
    gen = torch.Generator(device="cuda").manual_seed(0)
    res = dict(device=torch.cuda.get_device_name(), versions=dict(torch=torch.__version__, triton=triton.__version__),
               rows=[])
    variants = [("normal", 1, 0, 0), ("clusters_of_2", 2, 0, 0), ("clusters_of_4", 4, 0, 0),
                ("clusters_of_8", 8, 0, 0), ("clusters_of_8_one_cta_per_sm", 8, 120 * 1024, 0),
                ("one_cta_per_sm_no_cluster", 1, 120 * 1024, 0), ("combine_1_warp", 1, 0, 1),
                ("combine_2_warps", 1, 0, 2), ("combine_8_warps", 1, 0, 8), ("normal_again", 1, 0, 0)]
    for s, hk, layers in ((4096, 8, 32), (16384, 8, 32), (65536, 32, 4)):
        qs = [torch.randn(1, 1, 32, 128, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(layers)]
        ks = [torch.randn(1, s, hk, 128, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(layers)]
        vs = [torch.randn_like(k) for k in ks]
        kv = 2 * ks[0].numel() * 2 * layers
        ref = D.split_kv_forward(qs[0], ks[0], vs[0], softmax_scale=128 ** -0.5)[0]

        def step():
            for q, k, v in zip(qs, ks, vs):
                D.split_kv_forward(q, k, v, softmax_scale=128 ** -0.5)
        for name, n, smem, cw in variants:
            MODE.update(cluster=n, smem=smem, combine_warps=cw)
            before = D.LAUNCHES["split_kv_gluon"]
            try:
                same = bool(torch.equal(D.split_kv_forward(qs[0], ks[0], vs[0], softmax_scale=128 ** -0.5)[0], ref))
                ms = triton.testing.do_bench(graph_of(step).replay, warmup=25, rep=150, return_mode="median")
                row = dict(seqlen=s, hk=hk, layers=layers, variant=name, cluster=n, smem=smem, combine_warps=cw,
                           output_equal=same, gluon_launches=D.LAUNCHES["split_kv_gluon"] - before,
                           us_per_call=ms * 1e3 / layers, tbs=kv / ms / 1e9)
            except Exception as exc:  # noqa: BLE001 - the failure is the measurement
                row = dict(seqlen=s, hk=hk, variant=name, error=f"{type(exc).__name__}: {exc}"[:300])
            print(json.dumps(row), flush=True)
            res["rows"].append(row)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "probe_cluster_launch.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
