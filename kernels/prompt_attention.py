"""Triton kernels: a frame's own queries attend over own + local + global + summary keys.

The extended key sequence of a frame is never materialised. Each program owns one tile
of one (frame, head) pair and reads four key/value sources in place:

    own      q, k, v     [F, S, H, Dh]   any strides (views of a fused QKV output);
                         their gradients: any strides with unit stride along Dh
    local    lk, lv      [n_groups, P, H, Dh]  contiguous; frame f uses group f // frames_per_group
    global   gk, gv      [G, H, Dh]      contiguous; shared by every frame
    summary  sk, sv      [F, H, Dh]      contiguous; one key per frame

Own keys are walked in BLOCK_N tiles; the P + G + 1 prompt keys of a frame form one
extra "prompt tile" (rows [0, P) local, [P, P + G) global, P + G summary), loaded with
three masked loads. Softmax runs in base 2; LSE is stored in base 2 for the backward.

Backward (FlashAttention-2 style, no atomics):
  _bwd_dq      per query tile: delta = rowsum(dO * O) (stored for _bwd_dkdv) and dQ.
  _bwd_dkdv    per key tile of a frame: dK, dV; own tiles write dk/dv, the prompt tile
               writes per-frame fp32 partials that the wrapper reduces with torch .sum
               (local over the frames of a group, global over all frames); the summary
               key belongs to one frame and is written directly.
"""
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _load_prompt_tile(LP, GP, SP, group, frame, offs_j, offs_d, d_mask, H, head,
                      P: tl.constexpr, G: tl.constexpr, HAS_SUMMARY: tl.constexpr,
                      HEAD_DIM: tl.constexpr, BLOCK_PR: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows [0, P) from the group's local prompts, [P, P + G) global, P + G the frame's summary."""
    row = H * HEAD_DIM
    tile = tl.zeros((BLOCK_PR, BLOCK_D), dtype=LP.dtype.element_ty)
    if P > 0:
        local_rows = offs_j < P
        ptrs = LP + group.to(tl.int64) * (P * row) + head * HEAD_DIM + offs_j[:, None] * row + offs_d[None, :]
        tile += tl.load(ptrs, mask=local_rows[:, None] & d_mask[None, :], other=0.0)
    if G > 0:
        global_rows = (offs_j >= P) & (offs_j < P + G)
        ptrs = GP + head * HEAD_DIM + (offs_j - P)[:, None] * row + offs_d[None, :]
        tile += tl.load(ptrs, mask=global_rows[:, None] & d_mask[None, :], other=0.0)
    if HAS_SUMMARY:
        summary_rows = offs_j == P + G
        ptrs = SP + frame.to(tl.int64) * row + head * HEAD_DIM + offs_j[:, None] * 0 + offs_d[None, :]
        tile += tl.load(ptrs, mask=summary_rows[:, None] & d_mask[None, :], other=0.0)
    return tile


@triton.jit
def _load_prompt_kv(LK, LV, GK, GV, SK, SV, frame, frames_per_group, offs_d, d_mask, H, head,
                    P: tl.constexpr, G: tl.constexpr, HAS_SUMMARY: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_PR: tl.constexpr, BLOCK_D: tl.constexpr):
    """The frame's prompt keys and values (`_load_prompt_tile`) and their row offsets."""
    group = frame // frames_per_group
    offs_j = tl.arange(0, BLOCK_PR)
    k = _load_prompt_tile(LK, GK, SK, group, frame, offs_j, offs_d, d_mask, H, head,
                          P, G, HAS_SUMMARY, HEAD_DIM, BLOCK_PR, BLOCK_D)
    v = _load_prompt_tile(LV, GV, SV, group, frame, offs_j, offs_d, d_mask, H, head,
                          P, G, HAS_SUMMARY, HEAD_DIM, BLOCK_PR, BLOCK_D)
    return k, v, offs_j


@triton.jit
def _online_softmax_step(acc, m_i, l_i, q, k, v, key_mask, qk_scale, PRECISION: tl.constexpr):
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    s = tl.where(key_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _program_coords(n_tiles, H):
    """(tile, frame*head index, frame, head) of this program: a 1-D grid with the tiles of one
    (frame, head) adjacent, so that they share its K/V in L2."""
    tile = tl.program_id(0) % n_tiles
    pid_fh = tl.program_id(0) // n_tiles
    return tile, pid_fh, pid_fh // H, pid_fh % H


@triton.jit
def _fwd(Q, K, V, LK, LV, GK, GV, SK, SV, O, LSE,
         sq_f, sq_s, sq_h, sq_d, sk_f, sk_s, sk_h, sk_d, sv_f, sv_s, sv_h, sv_d,
         S, H, frames_per_group, qk_scale,
         P: tl.constexpr, G: tl.constexpr, HAS_SUMMARY: tl.constexpr,
         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
         BLOCK_N: tl.constexpr, BLOCK_PR: tl.constexpr, PRECISION: tl.constexpr):
    pid_m, pid_fh, frame, head = _program_coords(tl.cdiv(S, BLOCK_M), H)
    frame64 = frame.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_mask = offs_m < S

    q_ptrs = Q + frame64 * sq_f + head * sq_h + offs_m[:, None] * sq_s + offs_d[None, :] * sq_d
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    k_ptrs = K + frame64 * sk_f + head * sk_h + offs_n[:, None] * sk_s + offs_d[None, :] * sk_d
    v_ptrs = V + frame64 * sv_f + head * sv_h + offs_n[:, None] * sv_s + offs_d[None, :] * sv_d

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start_n in range(0, S, BLOCK_N):
        keys = start_n + offs_n
        key_mask = keys < S
        kv_mask = key_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptrs + start_n * sk_s, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs + start_n * sv_s, mask=kv_mask, other=0.0)
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, key_mask, qk_scale, PRECISION)

    N_PROMPTS: tl.constexpr = P + G + HAS_SUMMARY
    if N_PROMPTS > 0:
        k, v, offs_j = _load_prompt_kv(LK, LV, GK, GV, SK, SV, frame, frames_per_group, offs_d, d_mask, H, head,
                                       P, G, HAS_SUMMARY, HEAD_DIM, BLOCK_PR, BLOCK_D)
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, offs_j < N_PROMPTS,
                                             qk_scale, PRECISION)

    acc = acc / l_i[:, None]
    row = H * HEAD_DIM
    o_ptrs = O + frame64 * S * row + offs_m[:, None] * row + head * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    tl.store(LSE + pid_fh.to(tl.int64) * S + offs_m, m_i + tl.log2(l_i), mask=m_mask)


@triton.jit
def _dq_step(dq, q, do, k, v, lse, delta, key_mask, qk_scale, PRECISION: tl.constexpr):
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    p = tl.where(key_mask[None, :], tl.exp2(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit
def _bwd_dq(Q, K, V, LK, LV, GK, GV, SK, SV, O, DO, LSE, DELTA, DQ,
            sq_f, sq_s, sq_h, sq_d, sk_f, sk_s, sk_h, sk_d, sv_f, sv_s, sv_h, sv_d,
            sdq_f, sdq_s, sdq_h,
            S, H, frames_per_group, qk_scale, sm_scale,
            P: tl.constexpr, G: tl.constexpr, HAS_SUMMARY: tl.constexpr,
            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_PR: tl.constexpr, PRECISION: tl.constexpr):
    pid_m, pid_fh, frame, head = _program_coords(tl.cdiv(S, BLOCK_M), H)
    frame64 = frame.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_mask = offs_m < S
    md_mask = m_mask[:, None] & d_mask[None, :]

    row = H * HEAD_DIM
    dense = frame64 * S * row + offs_m[:, None] * row + head * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + frame64 * sq_f + head * sq_h + offs_m[:, None] * sq_s + offs_d[None, :] * sq_d,
                mask=md_mask, other=0.0)
    do = tl.load(DO + dense, mask=md_mask, other=0.0)
    o = tl.load(O + dense, mask=md_mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    stat = pid_fh.to(tl.int64) * S + offs_m
    tl.store(DELTA + stat, delta, mask=m_mask)
    lse = tl.load(LSE + stat, mask=m_mask, other=0.0)

    k_ptrs = K + frame64 * sk_f + head * sk_h + offs_n[:, None] * sk_s + offs_d[None, :] * sk_d
    v_ptrs = V + frame64 * sv_f + head * sv_h + offs_n[:, None] * sv_s + offs_d[None, :] * sv_d
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(0, S, BLOCK_N):
        keys = start_n + offs_n
        key_mask = keys < S
        kv_mask = key_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptrs + start_n * sk_s, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs + start_n * sv_s, mask=kv_mask, other=0.0)
        dq = _dq_step(dq, q, do, k, v, lse, delta, key_mask, qk_scale, PRECISION)

    N_PROMPTS: tl.constexpr = P + G + HAS_SUMMARY
    if N_PROMPTS > 0:
        k, v, offs_j = _load_prompt_kv(LK, LV, GK, GV, SK, SV, frame, frames_per_group, offs_d, d_mask, H, head,
                                       P, G, HAS_SUMMARY, HEAD_DIM, BLOCK_PR, BLOCK_D)
        dq = _dq_step(dq, q, do, k, v, lse, delta, offs_j < N_PROMPTS, qk_scale, PRECISION)

    dq_ptrs = DQ + frame64 * sdq_f + head * sdq_h + offs_m[:, None] * sdq_s + offs_d[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=md_mask)


@triton.jit
def _bwd_dkdv(Q, K, V, LK, LV, GK, GV, SK, SV, DO, LSE, DELTA,
              DK, DV, DLK, DLV, DGK, DGV, DSK, DSV,
              sq_f, sq_s, sq_h, sq_d, sk_f, sk_s, sk_h, sk_d, sv_f, sv_s, sv_h, sv_d,
              sdk_f, sdk_s, sdk_h, sdv_f, sdv_s, sdv_h,
              S, H, frames_per_group, qk_scale, sm_scale,
              P: tl.constexpr, G: tl.constexpr, HAS_SUMMARY: tl.constexpr,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_PR: tl.constexpr, PRECISION: tl.constexpr):
    """Program n < cdiv(S, BLOCK_N): own key tile n; the last program: the prompt tile."""
    own_tiles = tl.cdiv(S, BLOCK_N)
    pid_n, pid_fh, frame, head = _program_coords(own_tiles + 1, H)
    frame64 = frame.to(tl.int64)
    row = H * HEAD_DIM
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM

    if pid_n < own_tiles:
        _own_key_grads(Q, K, V, DO, LSE, DELTA, DK, DV, pid_n, frame64, head, pid_fh,
                       sq_f, sq_s, sq_h, sq_d, sk_f, sk_s, sk_h, sk_d, sv_f, sv_s, sv_h, sv_d,
                       sdk_f, sdk_s, sdk_h, sdv_f, sdv_s, sdv_h,
                       S, row, qk_scale, sm_scale, offs_d, d_mask,
                       HEAD_DIM, BLOCK_M, BLOCK_N, PRECISION)
    elif P + G + HAS_SUMMARY > 0:
        _prompt_key_grads(Q, LK, LV, GK, GV, SK, SV, DO, LSE, DELTA, DLK, DLV, DGK, DGV, DSK, DSV,
                          frame, frame64, head, pid_fh, sq_f, sq_s, sq_h, sq_d, S, H, row,
                          frames_per_group, qk_scale, sm_scale, offs_d, d_mask,
                          P, G, HAS_SUMMARY, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_PR, PRECISION)


@triton.jit
def _own_key_grads(Q, K, V, DO, LSE, DELTA, DK, DV, pid_n, frame64, head, pid_fh,
                   sq_f, sq_s, sq_h, sq_d, sk_f, sk_s, sk_h, sk_d, sv_f, sv_s, sv_h, sv_d,
                   sdk_f, sdk_s, sdk_h, sdv_f, sdv_s, sdv_h,
                   S, row, qk_scale, sm_scale, offs_d, d_mask,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   PRECISION: tl.constexpr):
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    key_mask = offs_n < S
    kv_mask = key_mask[:, None] & d_mask[None, :]
    k = tl.load(K + frame64 * sk_f + head * sk_h + offs_n[:, None] * sk_s + offs_d[None, :] * sk_d,
                mask=kv_mask, other=0.0)
    v = tl.load(V + frame64 * sv_f + head * sv_h + offs_n[:, None] * sv_s + offs_d[None, :] * sv_d,
                mask=kv_mask, other=0.0)
    dk, dv = _dkdv_tile(Q, DO, LSE, DELTA, k, v, key_mask, frame64, head, pid_fh,
                        sq_f, sq_s, sq_h, sq_d, S, row, qk_scale, offs_d, d_mask,
                        HEAD_DIM, BLOCK_M, PRECISION)
    dk_ptrs = DK + frame64 * sdk_f + head * sdk_h + offs_n[:, None] * sdk_s + offs_d[None, :]
    dv_ptrs = DV + frame64 * sdv_f + head * sdv_h + offs_n[:, None] * sdv_s + offs_d[None, :]
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _prompt_key_grads(Q, LK, LV, GK, GV, SK, SV, DO, LSE, DELTA, DLK, DLV, DGK, DGV, DSK, DSV,
                      frame, frame64, head, pid_fh, sq_f, sq_s, sq_h, sq_d, S, H, row,
                      frames_per_group, qk_scale, sm_scale, offs_d, d_mask,
                      P: tl.constexpr, G: tl.constexpr, HAS_SUMMARY: tl.constexpr,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_PR: tl.constexpr, PRECISION: tl.constexpr):
    k, v, offs_j = _load_prompt_kv(LK, LV, GK, GV, SK, SV, frame, frames_per_group, offs_d, d_mask, H, head,
                                   P, G, HAS_SUMMARY, HEAD_DIM, BLOCK_PR, BLOCK_D)
    dk, dv = _dkdv_tile(Q, DO, LSE, DELTA, k, v, offs_j < P + G + HAS_SUMMARY, frame64, head, pid_fh,
                        sq_f, sq_s, sq_h, sq_d, S, row, qk_scale, offs_d, d_mask,
                        HEAD_DIM, BLOCK_M, PRECISION)
    dk = dk * sm_scale
    if P > 0:  # per-frame partials [F, P, H, Dh], summed over the group by the wrapper
        rows = offs_j < P
        ptrs = frame64 * (P * row) + offs_j[:, None] * row + head * HEAD_DIM + offs_d[None, :]
        tl.store(DLK + ptrs, dk, mask=rows[:, None] & d_mask[None, :])
        tl.store(DLV + ptrs, dv, mask=rows[:, None] & d_mask[None, :])
    if G > 0:  # per-frame partials [F, G, H, Dh], summed over all frames by the wrapper
        rows = (offs_j >= P) & (offs_j < P + G)
        ptrs = frame64 * (G * row) + (offs_j - P)[:, None] * row + head * HEAD_DIM + offs_d[None, :]
        tl.store(DGK + ptrs, dk, mask=rows[:, None] & d_mask[None, :])
        tl.store(DGV + ptrs, dv, mask=rows[:, None] & d_mask[None, :])
    if HAS_SUMMARY:  # [F, H, Dh]: the summary key belongs to this frame alone
        rows = offs_j == P + G
        ptrs = frame64 * row + offs_j[:, None] * 0 + head * HEAD_DIM + offs_d[None, :]
        tl.store(DSK + ptrs, dk.to(DSK.dtype.element_ty), mask=rows[:, None] & d_mask[None, :])
        tl.store(DSV + ptrs, dv.to(DSV.dtype.element_ty), mask=rows[:, None] & d_mask[None, :])


@triton.jit
def _dkdv_tile(Q, DO, LSE, DELTA, k, v, key_mask, frame64, head, pid_fh,
               sq_f, sq_s, sq_h, sq_d, S, row, qk_scale, offs_d, d_mask,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    """dK (unscaled by sm_scale) and dV of one key tile, over every query of the frame."""
    dk = tl.zeros(k.shape, dtype=tl.float32)
    dv = tl.zeros(v.shape, dtype=tl.float32)
    q_base = Q + frame64 * sq_f + head * sq_h
    offs_mb = tl.arange(0, BLOCK_M)
    for start_m in range(0, S, BLOCK_M):
        offs_m = start_m + offs_mb
        m_mask = offs_m < S
        md_mask = m_mask[:, None] & d_mask[None, :]
        q = tl.load(q_base + offs_m[:, None] * sq_s + offs_d[None, :] * sq_d, mask=md_mask, other=0.0)
        do = tl.load(DO + frame64 * S * row + offs_m[:, None] * row + head * HEAD_DIM + offs_d[None, :],
                     mask=md_mask, other=0.0)
        stat = pid_fh.to(tl.int64) * S + offs_m
        lse = tl.load(LSE + stat, mask=m_mask, other=float("inf"))
        delta = tl.load(DELTA + stat, mask=m_mask, other=0.0)
        # transposed scores: keys along rows, queries along columns
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        p_t = tl.where(key_mask[:, None], tl.exp2(s_t - lse[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv
