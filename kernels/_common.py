"""Jit helpers shared by the forward and backward kernels: the score modifiers (softcap, ALiBi, bias, window
mask), the in-kernel dropout RNG, and the block ranges a query or key block must visit.

Scores are kept in the exp2 domain: ``s2 = s * log2(e)``, so softmaxes use ``exp2``. Every helper works on
broadcastable row/column index tiles, so the backward's transposed (key-major) tiles reuse them unchanged.
"""

import inspect
import os

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# A window side of -1 (unbounded) is passed to the kernels as this many positions.
UNBOUNDED = 1 << 28


def fix_interpreter_scalar_index() -> bool:
    """Let Triton's CPU interpreter of triton <= 3.6 run with numpy >= 2.4. Returns True when it patched.

    Those interpreters turn a scalar used as a loop bound into a Python int with ``int(array)``, and a scalar
    is a numpy array of shape (1,) there; numpy 2.4 made ``int()`` of a 1-element array that is not 0-d an
    error ("only 0-dimensional arrays can be converted to Python scalars"), so every kernel with a runtime loop
    bound failed (measured: triton 3.6.0 with numpy 2.4.6 here and 2.5.2 on the GPU image). Newer Triton
    squeezes the array first (triton 3.9); this does the same, only where the interpreter still has the old
    conversion, and only while a kernel is being interpreted (the interpreter installs and removes its
    patches around each launch; ours is added after its own and removed with them).
    """
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_hf_flash_fixed", False):
        return False
    try:
        source = inspect.getsource(original)
    except (OSError, TypeError):
        return False
    if "int(self.handle.data)" not in source.replace(" ", ""):
        return False

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0])
                       if self.handle.data.size == 1 else int(self.handle.data))

    patch_lang_tensor._hf_flash_fixed = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True


if os.environ.get("TRITON_INTERPRET") == "1":
    fix_interpreter_scalar_index()


@triton.jit
def mma(a, b, acc, DOT_PREC: tl.constexpr):
    """tl.dot with the precision chosen by the launcher. "interp-bf16" works around Triton's interpreter, whose
    bfloat16 dot returns garbage (seen on triton 3.9, CPU): operands are widened to float32, which multiplies
    the same bf16 values exactly. Never used on a GPU."""
    if DOT_PREC == "interp-bf16":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def tanh_f32(x):
    # tanh through exp2 so it needs nothing beyond the core language; exact to float32 rounding.
    e = tl.exp2(x * (2.0 * 1.4426950408889634))
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def _keep16(r, thr):
    # the two 16-bit halves of a Philox word against the threshold, as int8 keep flags stacked on a new last axis
    return tl.join(((r & 0xFFFF) >= thr).to(tl.int8), ((r >> 16) >= thr).to(tl.int8))


@triton.jit
def dropout_keep(seed, offset, bh, rows, col_start, dropout_p, BLOCK_N: tl.constexpr):
    """Keep-mask (True = keep), shape (len(rows), BLOCK_N), for the attention entries (rows, col_start + j) of
    head-batch index ``bh``; ``col_start`` is a multiple of 8.

    One Philox4x32-7 call serves 8 neighbouring columns of a row: it is keyed on the seed and counts
    (col // 8, row, bh, offset), and each of its four 32-bit words gives two 16-bit uniforms, compared with
    round(dropout_p * 65536). So every entry draws the same bits whatever the tiling of the kernel that asks (the
    forward, the backward and the debug mask kernel agree), and the generator costs an eighth of a call of
    Philox per entry (the 10-round, one-word-per-entry draw this replaces made the forward 4.7x slower with
    dropout than without, on an H200 at GPT-2's shapes). As in flash-attn, which compares 8-bit values, the keep
    probability is 1 - dropout_p up to the threshold's resolution (here 2**-16) while the kept values are
    scaled by exactly 1 / (1 - dropout_p). Seven rounds is the smallest Philox4x32 that passes BigCrush
    (Salmon et al., 2011, "Parallel random numbers: as easy as 1, 2, 3"), and what flash-attn runs.
    """
    groups = (col_start // 8 + tl.arange(0, BLOCK_N // 8)).to(tl.uint32)
    zero = (rows[:, None] * 0 + groups[None, :] * 0).to(tl.uint32)
    c0 = zero + groups[None, :]
    c1 = zero + rows[:, None].to(tl.uint32)
    c2 = zero + bh.to(tl.uint32)
    c3 = zero + offset.to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3, n_rounds=7)
    thr = (tl.full([], 0.5, tl.float32) + dropout_p * 65536.0).to(tl.uint32)
    # (rows, groups, half, word // 2, word % 2): column = 8 * group + 4 * half + word after the reshape
    flags = tl.join(tl.join(_keep16(r0, thr), _keep16(r2, thr)), tl.join(_keep16(r1, thr), _keep16(r3, thr)))
    return tl.reshape(flags, (rows.shape[0], BLOCK_N)) != 0


@triton.jit
def seq_bounds(CuQ, CuK, b, seqlen_q_arg, seqlen_k_arg, IS_VARLEN: tl.constexpr):
    """(q_start, seqlen_q, k_start, seqlen_k) of sequence ``b``: read from cu_seqlens (varlen) or the dense
    lengths with start 0."""
    if IS_VARLEN:
        q_start = tl.load(CuQ + b)
        seqlen_q = tl.load(CuQ + b + 1) - q_start
        k_start = tl.load(CuK + b)
        seqlen_k = tl.load(CuK + b + 1) - k_start
    else:
        q_start = tl.full([], 0, tl.int32)
        seqlen_q = seqlen_q_arg + q_start
        k_start = tl.full([], 0, tl.int32)
        seqlen_k = seqlen_k_arg + k_start
    return q_start, seqlen_q, k_start, seqlen_k


@triton.jit
def head_params(Alibi, Rng, b, h, stride_ab, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """Per (batch, head) scalars: the ALiBi slope, and the dropout RNG's seed and offset (0 when unused)."""
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Alibi + b * stride_ab + h)
    seed = 0
    rng_offset = 0
    if HAS_DROPOUT:
        seed = tl.load(Rng)
        rng_offset = tl.load(Rng + 1)
    return slope, seed, rng_offset


@triton.jit
def load_bias_tile(bias_base, rows, cols, seqlen_q, seqlen_k, stride_bm, stride_bn,
                   BIAS_TYPE: tl.constexpr):
    """The attention bias (float, or bool with True = attend) at query positions ``rows`` and key positions
    ``cols`` (broadcastable index tiles, either orientation), and whether any entry of it lets attention
    through: tiles the bias masks entirely are skipped by the callers. Without a bias: (0.0, True)."""
    if BIAS_TYPE == 0:
        bias = 0.0
        live = True
    else:
        ptrs = bias_base + rows * stride_bm + cols * stride_bn
        mask = (rows < seqlen_q) & (cols < seqlen_k)
        if BIAS_TYPE == 1:
            bias = tl.load(ptrs, mask=mask, other=float("-inf"))
            live = tl.max(tl.max(bias.to(tl.float32), 1), 0) > float("-inf")
        else:
            bias = tl.load(ptrs, mask=mask, other=0) != 0
            live = tl.max(tl.max(bias.to(tl.int32), 1), 0) > 0
    return bias, live


@triton.jit
def score_mod(qk, rows, cols, shift, seqlen_k, scale_log2, softcap, slope, bias, window_left, window_right,
              HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, BIAS_TYPE: tl.constexpr,
              MASKED: tl.constexpr, WINDOWED: tl.constexpr):
    """From raw dot products ``qk`` to exp2-domain scores; -inf where masked.

    Returns (s2, t) where ``t`` is tanh of the softcapped argument (needed by the backward; 0 without softcap).
    ``rows``/``cols`` are the query/key positions, broadcastable to qk's shape; ``shift = seqlen_k - seqlen_q``
    aligns query row i with key position i + shift (bottom-right alignment).
    """
    if HAS_SOFTCAP:
        # scale_log2 holds the plain softmax scale here
        t = tanh_f32(qk * (scale_log2 / softcap))
        s2 = t * (softcap * 1.4426950408889634)
    else:
        t = qk * 0.0
        s2 = qk * scale_log2
    if HAS_ALIBI:
        dist = rows + shift - cols
        dist = tl.where(dist < 0, -dist, dist)
        s2 = s2 - (slope * 1.4426950408889634) * dist.to(tl.float32)
    if BIAS_TYPE == 1:
        s2 = s2 + bias.to(tl.float32) * 1.4426950408889634
    if BIAS_TYPE == 2:
        s2 = tl.where(bias, s2, float("-inf"))
    if MASKED:
        keep = cols < seqlen_k
        if WINDOWED:
            diag = rows + shift
            keep = keep & (cols <= diag + window_right) & (cols >= diag - window_left)
        s2 = tl.where(keep, s2, float("-inf"))
    return s2, t


@triton.jit
def key_range(m_start, m_end, shift, seqlen_k, window_left, window_right, BLOCK_N: tl.constexpr):
    """Key blocks a query block [m_start, m_end) visits: (lo, full_lo, full_hi, hi).

    [lo, hi) holds every key the window lets any row see (blocks outside are skipped, not masked);
    [full_lo, full_hi) are whole blocks every row sees in full, run without masks.
    """
    lo = tl.maximum(m_start + shift - window_left, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.minimum(m_end - 1 + shift + window_right + 1, seqlen_k)
    full_lo = tl.maximum(m_end - 1 + shift - window_left, 0)
    full_lo = tl.maximum(((full_lo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, lo)
    full_hi = tl.maximum(m_start + shift + window_right + 1, 0)
    full_hi = tl.minimum((full_hi // BLOCK_N) * BLOCK_N, (seqlen_k // BLOCK_N) * BLOCK_N)
    full_hi = tl.maximum(full_hi, full_lo)
    full_lo = tl.minimum(full_lo, tl.maximum(hi, lo))
    full_hi = tl.minimum(full_hi, tl.maximum(hi, lo))
    return lo, full_lo, full_hi, hi


@triton.jit
def query_range(n_start, n_end, shift, seqlen_q, window_left, window_right, BLOCK_M: tl.constexpr):
    """Query blocks a key block [n_start, n_end) is seen by: (lo, full_lo, full_hi, hi), as in key_range."""
    lo = tl.maximum(n_start - shift - window_right, 0)
    lo = (lo // BLOCK_M) * BLOCK_M
    hi = tl.minimum(n_end - 1 - shift + window_left + 1, seqlen_q)
    full_lo = tl.maximum(n_end - 1 - shift - window_right, 0)
    full_lo = tl.maximum(((full_lo + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, lo)
    full_hi = tl.maximum(n_start - shift + window_left + 1, 0)
    full_hi = tl.minimum((full_hi // BLOCK_M) * BLOCK_M, (seqlen_q // BLOCK_M) * BLOCK_M)
    full_hi = tl.maximum(full_hi, full_lo)
    full_lo = tl.minimum(full_lo, tl.maximum(hi, lo))
    full_hi = tl.minimum(full_hi, tl.maximum(hi, lo))
    return lo, full_lo, full_hi, hi


@triton.jit
def rotate_row(x_ptr, offs_d, dmask, COS, SIN, cs_row, ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr,
               FULL_WIDTH: tl.constexpr, INVERSE: tl.constexpr):
    """x rotated in float32 by the cos/sin row at element offset ``cs_row``; dims past ROTARY_DIM pass through.
    The row holds rotary_dim / 2 values (flash-attn's tables), or with FULL_WIDTH one value per dim
    (transformers' cos/sin, non-interleaved: x * cos + rotate_half(x) * sin exactly as its models compute it).
    ``x_ptr`` may be a 2-D tile of row pointers (heads x 1) with ``offs_d`` (1 x dims) and ``dmask`` broadcast.
    INVERSE applies the transposed map (the backward of the rotation: the partner's term changes sign and takes
    the partner's sin, which matters where a table's halves differ)."""
    x = tl.load(x_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
    in_rot = offs_d < ROTARY_DIM
    if INTERLEAVED:
        partner = offs_d ^ 1
        ci = offs_d // 2
        sign = tl.where(offs_d % 2 == 0, -1.0, 1.0)
    else:
        partner = tl.where(offs_d < ROTARY_DIM // 2, offs_d + ROTARY_DIM // 2, offs_d - ROTARY_DIM // 2)
        if FULL_WIDTH:
            ci = offs_d
        else:
            ci = offs_d % (ROTARY_DIM // 2)
        sign = tl.where(offs_d < ROTARY_DIM // 2, -1.0, 1.0)
    si = ci
    if INVERSE:
        sign = -sign
        if FULL_WIDTH and not INTERLEAVED:
            si = partner  # full-width tables: the partner's sin is at its own index (half tables share ci)
    xp = tl.load(x_ptr + partner, mask=in_rot & dmask, other=0.0).to(tl.float32)
    c = tl.load(COS + cs_row + ci, mask=in_rot, other=1.0).to(tl.float32)
    s = tl.load(SIN + cs_row + si, mask=in_rot, other=0.0).to(tl.float32)
    return x * c + sign * xp * s

