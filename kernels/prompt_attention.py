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

Tails: S = 197 (ViT-B/16) leaves 5 rows past the last full 64-row tile. A loop over rows
takes its full tiles, then one step of TAIL_* rows (the remainder rounded up to a power of
two >= 16); the launcher covers a kernel's own row tiles with full tiles, then further
launches of smaller tiles from `row_start` (`ops.attention._row_tiles`: 197 = 3 x 64 + 16,
or 128 + 64 + 16). With 64-row tiles at S = 197 a frame-head computes 208 x 240 query x key
rows (own keys, then the 32-row prompt tile) instead of 256 x 288: a third less.

Backward (FlashAttention-2 style, no atomics), split in two kernels (the default):
  _bwd_dq      per query tile: delta = rowsum(dO * O) (stored for _bwd_dkdv) and dQ.
  _bwd_dkdv    per key tile of a frame: dK, dV; own tiles write dk/dv, the prompt tile
               writes per-frame fp32 partials that the wrapper reduces with torch .sum
               (local over the frames of a group, global over all frames); the summary
               key belongs to one frame and is written directly.
or fused in one (VITACLIP_ATTENTION_BACKWARD=fused, ops/attention.py):
  _bwd_fused   per frame-head: delta, then _bwd_dkdv's work for each key tile in turn, each
               also adding its share of dQ to the program's own fp32 accumulator (no other
               program writes it, so no atomics), then dQ. Five matmuls per query x key tile
               where the split kernels take seven, in fewer, longer programs.
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
def _load_rows(base, rows, stride_row, stride_d, offs_d, d_mask, S):
    """Rows `rows` (masked to < S) of one (frame, head)'s [S, Dh] slice at `base`."""
    mask = (rows < S)[:, None] & d_mask[None, :]
    return tl.load(base + rows[:, None] * stride_row + offs_d[None, :] * stride_d, mask=mask, other=0.0)


@triton.jit
def _fwd_own_keys(acc, m_i, l_i, q, k_base, v_base, start, sk_s, sk_d, sv_s, sv_d, S, offs_d, d_mask, qk_scale,
                  ROWS: tl.constexpr, PRECISION: tl.constexpr):
    keys = start + tl.arange(0, ROWS)
    k = _load_rows(k_base, keys, sk_s, sk_d, offs_d, d_mask, S)
    v = _load_rows(v_base, keys, sv_s, sv_d, offs_d, d_mask, S)
    return _online_softmax_step(acc, m_i, l_i, q, k, v, keys < S, qk_scale, PRECISION)


@triton.jit
def _query_tile(n_tiles, H, row_start, S, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """A query-tile program's (frame * head index, frame, head as int64, its query rows and their
    mask, head-dim offsets and their mask): BLOCK_M rows from row_start + tile * BLOCK_M."""
    tile, pid_fh, frame, head = _program_coords(n_tiles, H)
    offs_m = row_start + tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    return pid_fh, frame, head, frame.to(tl.int64), offs_m, offs_m < S, offs_d, offs_d < HEAD_DIM


@triton.jit
def _fwd(Q, K, V, LK, LV, GK, GV, SK, SV, O, LSE,
         sq_f, sq_s, sq_h, sq_d, sk_f, sk_s, sk_h, sk_d, sv_f, sv_s, sv_h, sv_d,
         S, H, frames_per_group, qk_scale, row_start, n_tiles,
         P: tl.constexpr, G: tl.constexpr, HAS_SUMMARY: tl.constexpr,
         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
         BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr, BLOCK_PR: tl.constexpr, PRECISION: tl.constexpr):
    """Program: BLOCK_M queries from row_start + tile * BLOCK_M of one (frame, head)."""
    pid_fh, frame, head, frame64, offs_m, m_mask, offs_d, d_mask = _query_tile(n_tiles, H, row_start, S, HEAD_DIM,
                                                                              BLOCK_D, BLOCK_M)
    q = _load_rows(Q + frame64 * sq_f + head * sq_h, offs_m, sq_s, sq_d, offs_d, d_mask, S)
    k_base = K + frame64 * sk_f + head * sk_h
    v_base = V + frame64 * sv_f + head * sv_h

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    full = S - S % BLOCK_N
    for start_n in range(0, full, BLOCK_N):
        acc, m_i, l_i = _fwd_own_keys(acc, m_i, l_i, q, k_base, v_base, start_n, sk_s, sk_d, sv_s, sv_d, S,
                                      offs_d, d_mask, qk_scale, BLOCK_N, PRECISION)
    if full < S:
        acc, m_i, l_i = _fwd_own_keys(acc, m_i, l_i, q, k_base, v_base, full, sk_s, sk_d, sv_s, sv_d, S,
                                      offs_d, d_mask, qk_scale, TAIL_N, PRECISION)

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
def _dq_own_keys(dq, q, do, lse, delta, k_base, v_base, start, sk_s, sk_d, sv_s, sv_d, S, offs_d, d_mask,
                 qk_scale, ROWS: tl.constexpr, PRECISION: tl.constexpr):
    keys = start + tl.arange(0, ROWS)
    k = _load_rows(k_base, keys, sk_s, sk_d, offs_d, d_mask, S)
    v = _load_rows(v_base, keys, sv_s, sv_d, offs_d, d_mask, S)
    return _dq_step(dq, q, do, k, v, lse, delta, keys < S, qk_scale, PRECISION)


@triton.jit
def _bwd_dq(Q, K, V, LK, LV, GK, GV, SK, SV, O, DO, LSE, DELTA, DQ,
            sq_f, sq_s, sq_h, sq_d, sk_f, sk_s, sk_h, sk_d, sv_f, sv_s, sv_h, sv_d,
            sdq_f, sdq_s, sdq_h,
            S, H, frames_per_group, qk_scale, sm_scale, row_start, n_tiles,
            P: tl.constexpr, G: tl.constexpr, HAS_SUMMARY: tl.constexpr,
            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr, BLOCK_PR: tl.constexpr, PRECISION: tl.constexpr):
    """Program: BLOCK_M queries from row_start + tile * BLOCK_M of one (frame, head)."""
    pid_fh, frame, head, frame64, offs_m, m_mask, offs_d, d_mask = _query_tile(n_tiles, H, row_start, S, HEAD_DIM,
                                                                              BLOCK_D, BLOCK_M)
    md_mask = m_mask[:, None] & d_mask[None, :]

    row = H * HEAD_DIM
    dense = frame64 * S * row + offs_m[:, None] * row + head * HEAD_DIM + offs_d[None, :]
    q = _load_rows(Q + frame64 * sq_f + head * sq_h, offs_m, sq_s, sq_d, offs_d, d_mask, S)
    do = tl.load(DO + dense, mask=md_mask, other=0.0)
    o = tl.load(O + dense, mask=md_mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    stat = pid_fh.to(tl.int64) * S + offs_m
    tl.store(DELTA + stat, delta, mask=m_mask)
    lse = tl.load(LSE + stat, mask=m_mask, other=0.0)

    k_base = K + frame64 * sk_f + head * sk_h
    v_base = V + frame64 * sv_f + head * sv_h
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    full = S - S % BLOCK_N
    for start_n in range(0, full, BLOCK_N):
        dq = _dq_own_keys(dq, q, do, lse, delta, k_base, v_base, start_n, sk_s, sk_d, sv_s, sv_d, S, offs_d,
                          d_mask, qk_scale, BLOCK_N, PRECISION)
    if full < S:
        dq = _dq_own_keys(dq, q, do, lse, delta, k_base, v_base, full, sk_s, sk_d, sv_s, sv_d, S, offs_d,
                          d_mask, qk_scale, TAIL_N, PRECISION)

    N_PROMPTS: tl.constexpr = P + G + HAS_SUMMARY
    if N_PROMPTS > 0:
        k, v, offs_j = _load_prompt_kv(LK, LV, GK, GV, SK, SV, frame, frames_per_group, offs_d, d_mask, H, head,
                                       P, G, HAS_SUMMARY, HEAD_DIM, BLOCK_PR, BLOCK_D)
        dq = _dq_step(dq, q, do, k, v, lse, delta, offs_j < N_PROMPTS, qk_scale, PRECISION)

    dq_ptrs = DQ + frame64 * sdq_f + head * sdq_h + offs_m[:, None] * sdq_s + offs_d[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=md_mask)


@triton.jit
def _frame_head_bases(Q, DO, LSE, DELTA, pid_fh, frame64, head, sq_f, sq_h, S, H,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """What every query step of a frame-head's dK/dV reads: (row stride H * Dh, head-dim offsets and
    their mask, then the frame-head's queries, output gradients, LSE and delta)."""
    row = H * HEAD_DIM
    offs_d = tl.arange(0, BLOCK_D)
    return (row, offs_d, offs_d < HEAD_DIM, Q + frame64 * sq_f + head * sq_h,
            DO + frame64 * S * row + head * HEAD_DIM, LSE + pid_fh.to(tl.int64) * S, DELTA + pid_fh.to(tl.int64) * S)


@triton.jit
def _bwd_dkdv(Q, K, V, LK, LV, GK, GV, SK, SV, DO, LSE, DELTA,
              DK, DV, DLK, DLV, DGK, DGV, DSK, DSV,
              sq_f, sq_s, sq_h, sq_d, sk_f, sk_s, sk_h, sk_d, sv_f, sv_s, sv_h, sv_d,
              sdk_f, sdk_s, sdk_h, sdv_f, sdv_s, sdv_h,
              S, H, frames_per_group, qk_scale, sm_scale, row_start, n_tiles,
              P: tl.constexpr, G: tl.constexpr, HAS_SUMMARY: tl.constexpr,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_PR: tl.constexpr, PROMPT_PROGRAM: tl.constexpr,
              PRECISION: tl.constexpr):
    """Program n < n_tiles: the BLOCK_N own keys from row_start + n * BLOCK_N; with
    PROMPT_PROGRAM, program n_tiles: the prompt tile."""
    pid_n, pid_fh, frame, head = _program_coords(n_tiles + PROMPT_PROGRAM, H)
    frame64 = frame.to(tl.int64)
    row, offs_d, d_mask, q_base, do_base, lse_base, delta_base = _frame_head_bases(
        Q, DO, LSE, DELTA, pid_fh, frame64, head, sq_f, sq_h, S, H, HEAD_DIM, BLOCK_D)

    # (LSE stands in for the dQ accumulator that only _bwd_fused passes: ACC_DQ is off)
    if pid_n < n_tiles:
        _own_key_grads(K, V, DK, DV, row_start + pid_n * BLOCK_N, frame64, head,
                       q_base, do_base, lse_base, delta_base, LSE, sq_s, sq_d, S, row,
                       sk_f, sk_s, sk_h, sk_d, sv_f, sv_s, sv_h, sv_d, sdk_f, sdk_s, sdk_h, sdv_f, sdv_s, sdv_h,
                       qk_scale, sm_scale, offs_d, d_mask, BLOCK_M, TAIL_M, BLOCK_N, False, PRECISION)
    elif PROMPT_PROGRAM:
        _prompt_key_grads(LK, LV, GK, GV, SK, SV, DLK, DLV, DGK, DGV, DSK, DSV, frame, frame64, head,
                          q_base, do_base, lse_base, delta_base, LSE, sq_s, sq_d, S, row,
                          H, frames_per_group, qk_scale, sm_scale, offs_d, d_mask,
                          P, G, HAS_SUMMARY, HEAD_DIM, BLOCK_D, BLOCK_M, TAIL_M, BLOCK_PR, False, PRECISION)


@triton.jit
def _bwd_fused(Q, K, V, LK, LV, GK, GV, SK, SV, O, DO, LSE, DELTA, DQ_ACC,
               DQ, DK, DV, DLK, DLV, DGK, DGV, DSK, DSV,
               sq_f, sq_s, sq_h, sq_d, sk_f, sk_s, sk_h, sk_d, sv_f, sv_s, sv_h, sv_d,
               sdq_f, sdq_s, sdq_h, sdk_f, sdk_s, sdk_h, sdv_f, sdv_s, sdv_h,
               S, H, frames_per_group, qk_scale, sm_scale,
               P: tl.constexpr, G: tl.constexpr, HAS_SUMMARY: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr,
               BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr, BLOCK_PR: tl.constexpr, PRECISION: tl.constexpr):
    """Program: one (frame, head), its whole backward. Each key tile in turn (own tiles of BLOCK_N,
    their tail, the prompt tile) loops over every query, as a _bwd_dkdv program does, and adds its
    part of dQ to the program's own fp32 rows of DQ_ACC ([F * H, S, BLOCK_D]; written by no
    other program: no atomics, a fixed order); dQ is written once every key tile is done. Five
    matmuls per query x key tile instead of the split kernels' seven (_bwd_dq recomputes the
    scores and their gradient), in F * H programs instead of about eight per frame-head."""
    pid_fh = tl.program_id(0)
    frame, head = pid_fh // H, pid_fh % H
    frame64 = frame.to(tl.int64)
    row, offs_d, d_mask, q_base, do_base, lse_base, delta_base = _frame_head_bases(
        Q, DO, LSE, DELTA, pid_fh, frame64, head, sq_f, sq_h, S, H, HEAD_DIM, BLOCK_D)
    o_base = O + frame64 * S * row + head * HEAD_DIM
    acc_base = DQ_ACC + pid_fh.to(tl.int64) * S * BLOCK_D
    # delta = rowsum(dO * O) of every query, and the dQ accumulator zeroed, before any key tile
    for start_m in range(0, S, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        do = _load_rows(do_base, offs_m, row, 1, offs_d, d_mask, S)
        o = _load_rows(o_base, offs_m, row, 1, offs_d, d_mask, S)
        tl.store(delta_base + offs_m, tl.sum(do.to(tl.float32) * o.to(tl.float32), 1), mask=offs_m < S)
        zeros = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        tl.store(acc_base + offs_m[:, None] * BLOCK_D + offs_d[None, :], zeros,
                 mask=(offs_m < S)[:, None] & d_mask[None, :])
    tl.debug_barrier()  # the program's threads read each other's rows from here on

    full = S - S % BLOCK_N
    for start_n in range(0, full, BLOCK_N):
        _own_key_grads(K, V, DK, DV, start_n, frame64, head,
                       q_base, do_base, lse_base, delta_base, acc_base, sq_s, sq_d, S, row,
                       sk_f, sk_s, sk_h, sk_d, sv_f, sv_s, sv_h, sv_d, sdk_f, sdk_s, sdk_h, sdv_f, sdv_s, sdv_h,
                       qk_scale, sm_scale, offs_d, d_mask, BLOCK_M, TAIL_M, BLOCK_N, True, PRECISION)
    if full < S:
        _own_key_grads(K, V, DK, DV, full, frame64, head,
                       q_base, do_base, lse_base, delta_base, acc_base, sq_s, sq_d, S, row,
                       sk_f, sk_s, sk_h, sk_d, sv_f, sv_s, sv_h, sv_d, sdk_f, sdk_s, sdk_h, sdv_f, sdv_s, sdv_h,
                       qk_scale, sm_scale, offs_d, d_mask, BLOCK_M, TAIL_M, TAIL_N, True, PRECISION)
    if P + G + HAS_SUMMARY > 0:
        _prompt_key_grads(LK, LV, GK, GV, SK, SV, DLK, DLV, DGK, DGV, DSK, DSV, frame, frame64, head,
                          q_base, do_base, lse_base, delta_base, acc_base, sq_s, sq_d, S, row,
                          H, frames_per_group, qk_scale, sm_scale, offs_d, d_mask,
                          P, G, HAS_SUMMARY, HEAD_DIM, BLOCK_D, BLOCK_M, TAIL_M, BLOCK_PR, True, PRECISION)

    dq_base = DQ + frame64 * sdq_f + head * sdq_h
    for start_m in range(0, S, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask = (offs_m < S)[:, None] & d_mask[None, :]
        dq = tl.load(acc_base + offs_m[:, None] * BLOCK_D + offs_d[None, :], mask=mask, other=0.0)
        tl.store(dq_base + offs_m[:, None] * sdq_s + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
                 mask=mask)


@triton.jit
def _own_key_grads(K, V, DK, DV, start, frame64, head,
                   q_base, do_base, lse_base, delta_base, acc_base, sq_s, sq_d, S, row,
                   sk_f, sk_s, sk_h, sk_d, sv_f, sv_s, sv_h, sv_d, sdk_f, sdk_s, sdk_h, sdv_f, sdv_s, sdv_h,
                   qk_scale, sm_scale, offs_d, d_mask,
                   BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC_DQ: tl.constexpr,
                   PRECISION: tl.constexpr):
    offs_n = start + tl.arange(0, BLOCK_N)
    key_mask = offs_n < S
    kv_mask = key_mask[:, None] & d_mask[None, :]
    k = _load_rows(K + frame64 * sk_f + head * sk_h, offs_n, sk_s, sk_d, offs_d, d_mask, S)
    v = _load_rows(V + frame64 * sv_f + head * sv_h, offs_n, sv_s, sv_d, offs_d, d_mask, S)
    dk, dv = _dkdv_tile(k, v, key_mask, q_base, do_base, lse_base, delta_base, acc_base, sq_s, sq_d, S, row,
                        qk_scale, offs_d, d_mask, BLOCK_M, TAIL_M, ACC_DQ, PRECISION)
    dk_ptrs = DK + frame64 * sdk_f + head * sdk_h + offs_n[:, None] * sdk_s + offs_d[None, :]
    dv_ptrs = DV + frame64 * sdv_f + head * sdv_h + offs_n[:, None] * sdv_s + offs_d[None, :]
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _prompt_key_grads(LK, LV, GK, GV, SK, SV, DLK, DLV, DGK, DGV, DSK, DSV, frame, frame64, head,
                      q_base, do_base, lse_base, delta_base, acc_base, sq_s, sq_d, S, row,
                      H, frames_per_group, qk_scale, sm_scale, offs_d, d_mask,
                      P: tl.constexpr, G: tl.constexpr, HAS_SUMMARY: tl.constexpr,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr,
                      BLOCK_PR: tl.constexpr, ACC_DQ: tl.constexpr, PRECISION: tl.constexpr):
    k, v, offs_j = _load_prompt_kv(LK, LV, GK, GV, SK, SV, frame, frames_per_group, offs_d, d_mask, H, head,
                                   P, G, HAS_SUMMARY, HEAD_DIM, BLOCK_PR, BLOCK_D)
    dk, dv = _dkdv_tile(k, v, offs_j < P + G + HAS_SUMMARY, q_base, do_base, lse_base, delta_base, acc_base,
                        sq_s, sq_d, S, row, qk_scale, offs_d, d_mask, BLOCK_M, TAIL_M, ACC_DQ, PRECISION)
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
def _dkdv_queries(dk, dv, k, v, key_mask, q_base, do_base, lse_base, delta_base, acc_base, sq_s, sq_d, S, row,
                  start, qk_scale, offs_d, d_mask, ROWS: tl.constexpr, ACC_DQ: tl.constexpr,
                  PRECISION: tl.constexpr):
    """dK (unscaled by sm_scale) and dV of one key tile, accumulated over ROWS queries from `start`;
    with ACC_DQ, these queries' dQ from the key tile (unscaled) added to their fp32 rows at acc_base
    ([S, BLOCK_D], the program's own)."""
    offs_m = start + tl.arange(0, ROWS)
    m_mask = offs_m < S
    q = _load_rows(q_base, offs_m, sq_s, sq_d, offs_d, d_mask, S)
    do = _load_rows(do_base, offs_m, row, 1, offs_d, d_mask, S)
    lse = tl.load(lse_base + offs_m, mask=m_mask, other=float("inf"))
    delta = tl.load(delta_base + offs_m, mask=m_mask, other=0.0)
    # transposed scores: keys along rows, queries along columns
    s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
    p_t = tl.where(key_mask[:, None], tl.exp2(s_t - lse[None, :]), 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    if ACC_DQ:
        ptrs = acc_base + offs_m[:, None] * offs_d.shape[0] + offs_d[None, :]
        mask = m_mask[:, None] & d_mask[None, :]
        dq = tl.dot(tl.trans(ds_t).to(k.dtype), k, input_precision=PRECISION)
        tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + dq, mask=mask)
    return dk, dv


@triton.jit
def _dkdv_tile(k, v, key_mask, q_base, do_base, lse_base, delta_base, acc_base, sq_s, sq_d, S, row,
               qk_scale, offs_d, d_mask, BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr, ACC_DQ: tl.constexpr,
               PRECISION: tl.constexpr):
    """dK (unscaled by sm_scale) and dV of one key tile, over every query of the frame (read from
    q_base, do_base, lse_base and delta_base: the frame-head's queries, output gradients and row
    statistics)."""
    dk = tl.zeros(k.shape, dtype=tl.float32)
    dv = tl.zeros(v.shape, dtype=tl.float32)
    full = S - S % BLOCK_M
    for start_m in range(0, full, BLOCK_M):
        dk, dv = _dkdv_queries(dk, dv, k, v, key_mask, q_base, do_base, lse_base, delta_base, acc_base, sq_s, sq_d,
                               S, row, start_m, qk_scale, offs_d, d_mask, BLOCK_M, ACC_DQ, PRECISION)
    if full < S:
        dk, dv = _dkdv_queries(dk, dv, k, v, key_mask, q_base, do_base, lse_base, delta_base, acc_base, sq_s, sq_d,
                               S, row, full, qk_scale, offs_d, d_mask, TAIL_M, ACC_DQ, PRECISION)
    if ACC_DQ:  # the next key tile updates the same dQ rows, perhaps from other threads of the program
        tl.debug_barrier()
    return dk, dv
