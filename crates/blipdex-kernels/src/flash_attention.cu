// Flash attention (FlashAttention-2's forward pass) for unmasked multi-head attention in f16 or bf16,
// on tensor cores (mma.sync m16n8k16, sm_80 and newer), and its f32 counterpart on CUDA cores
// (attention_f32 below, for the Q-Former, which stays in f32 as in transformers). Compiled at run time with NVRTC
// (cuda_kernels.rs), and for the CPU with the warp instructions emulated (tests/flash_emulation.rs).
//
// softmax(scale · q·kᵀ) · v per (image, head) without the T × T scores ever reaching memory: q, k and
// v are read straight out of the projections ([B, T, row stride], head h at columns h·hd..), the
// output is written with the heads merged ([B, Tq, heads·hd]), so no head split or merge copies
// either. Scores, the running max / sum and the output accumulate in f32; the probabilities are
// rounded to the input's type for the second product, as FlashAttention and PyTorch's SDPA do.
//
// A block of 4 warps takes 64 queries (16 per warp, held in registers as mma A fragments) and walks
// the keys in tiles of 64 through shared memory, K and V row-major with rows padded by 8 halves so
// that a warp's fragment loads hit 32 distinct banks (V's fragments come transposed, by ldmatrix). Head sizes are padded to HDP
// (a multiple of 16) with zeros; keys past Tk are masked, queries past Tq are not written.
// Fragment layouts: PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type".

#ifndef BLIPDEX_EMULATE
typedef unsigned short u16;
typedef unsigned int u32;

// Tensor-core product and packing for one half type (f16 or bf16, the PTX type name).
template <bool BF16> struct Tc;
#define TC(BF16, TYPE)                                                                                          \
  template <> struct Tc<BF16> {                                                                                 \
    static __device__ __forceinline__ void mma(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {              \
      asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, " \
                   "{%8,%9}, {%0,%1,%2,%3};"                                                                    \
                   : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                             \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));                            \
    }                                                                                                           \
    /* lo in the low half, hi in the high half (cvt puts its first source in the high half) */                 \
    static __device__ __forceinline__ u32 pack(float lo, float hi) {                                           \
      u32 r;                                                                                                    \
      asm("cvt.rn." TYPE "x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));                                   \
      return r;                                                                                                 \
    }                                                                                                           \
  };
TC(false, "f16")
TC(true, "bf16")

// Four 8×8 b16 matrices from shared memory, transposed: lane i gives the address of row i % 8 of
// matrix i / 8 and receives in r[j] elements (2·(i % 4), i / 4) and (2·(i % 4) + 1, i / 4) of matrix j,
// an mma B fragment when the rows are k and the columns n.
__device__ __forceinline__ void ldsm_x4_trans(u32 (&r)[4], const u16 *row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "l"(row)
               : "memory");
}
#endif

#define FLASH_THREADS 128  // 4 warps a block (both kernel families)
#define FLASH_BQ 64        // queries per block, 16 per warp
#define FLASH_BK 64        // keys per tile
#define FLASH_FULL 0xffffffffu

// Elements (row, col) and (row, col + 1) of a [n, hd] matrix with row stride rs, zero outside it
// (col and hd even, so the pair is either inside or outside together).
__device__ __forceinline__ u32 flash_pair(const u16 *src, u32 rs, u32 row, u32 n, u32 col, u32 hd) {
  return (row < n && col < hd) ? *(const u32 *)(src + (size_t)row * rs + col) : 0u;
}

// Rows r0..r0 + 63 of a [n, hd] matrix with row stride rs into a tile of row stride HDP + 8, zero
// outside the matrix: in 16-byte chunks where hd, rs and src are multiples of 8 elements (vec), else
// in element pairs.
template <int HDP>
__device__ __forceinline__ void flash_tile(u16 *tile, const u16 *src, u32 rs, u32 r0, u32 n, u32 hd, bool vec) {
  const int KS = HDP + 8;
  if (vec) {
#pragma unroll 4
    for (int j = 0; j < 64 * HDP / 8 / FLASH_THREADS; j++) {
      const u32 i = threadIdx.x + j * FLASH_THREADS, r = i / (HDP / 8), c = (i % (HDP / 8)) * 8;
      uint4 x = {0u, 0u, 0u, 0u};
      if (r0 + r < n && c < hd) x = *(const uint4 *)(src + (size_t)(r0 + r) * rs + c);
      *(uint4 *)&tile[r * KS + c] = x;
    }
  } else {
#pragma unroll 4
    for (int j = 0; j < 64 * HDP / 2 / FLASH_THREADS; j++) {
      const u32 i = threadIdx.x + j * FLASH_THREADS, r = i / (HDP / 2), c = (i % (HDP / 2)) * 2;
      *(u32 *)&tile[r * KS + c] = flash_pair(src, rs, r0 + r, n, c, hd);
    }
  }
}

template <bool BF16, int HDP>
__device__ __forceinline__ void flash_attention(const u16 *q, const u16 *k, const u16 *v, u16 *out, u32 tq,
                                                u32 tk, u32 heads, u32 hd, u32 q_rs, u32 kv_rs, u32 o_rs,
                                                float scale_log2, bool vec) {
  const int KS = HDP + 8;  // tile row stride (halves; rows 16-byte aligned for ldmatrix)
  __shared__ __align__(16) u16 kt[FLASH_BK * KS];  // the Q tile first, then each K tile
  __shared__ __align__(16) u16 vt[FLASH_BK * KS];
  const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const u32 b = blockIdx.x / heads, h = blockIdx.x % heads, q0 = blockIdx.y * FLASH_BQ;
  q += (size_t)b * tq * q_rs + (size_t)h * hd;
  k += (size_t)b * tk * kv_rs + (size_t)h * hd;
  v += (size_t)b * tk * kv_rs + (size_t)h * hd;
  out += (size_t)b * tq * o_rs + (size_t)h * hd;

  flash_tile<HDP>(kt, q, q_rs, q0, tq, hd, vec);
  __syncthreads();
  u32 qa[HDP / 16][4];
  const u32 qr = warp * 16 + g;
#pragma unroll
  for (int kk = 0; kk < HDP / 16; kk++) {
    const u32 c = kk * 16 + 2 * t;
    qa[kk][0] = *(const u32 *)&kt[qr * KS + c];
    qa[kk][1] = *(const u32 *)&kt[(qr + 8) * KS + c];
    qa[kk][2] = *(const u32 *)&kt[qr * KS + c + 8];
    qa[kk][3] = *(const u32 *)&kt[(qr + 8) * KS + c + 8];
  }
  __syncthreads();

  float o[HDP / 8][4];
#pragma unroll
  for (int dn = 0; dn < HDP / 8; dn++) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.0f;
  // Rows g and g + 8 of this warp's 16: running max (of the raw scores) and partial sum (this
  // thread's columns only; the quad's four partials are added at the end).
  float m0 = __int_as_float(0xff800000), m1 = m0, l0 = 0.0f, l1 = 0.0f;

  for (u32 k0 = 0; k0 < tk; k0 += FLASH_BK) {
    flash_tile<HDP>(kt, k, kv_rs, k0, tk, hd, vec);
    flash_tile<HDP>(vt, v, kv_rs, k0, tk, hd, vec);
    __syncthreads();

    float s[FLASH_BK / 8][4];
#pragma unroll
    for (int nt = 0; nt < FLASH_BK / 8; nt++) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < HDP / 16; kk++) {
        const u16 *row = &kt[(nt * 8 + g) * KS + kk * 16 + 2 * t];
        Tc<BF16>::mma(s[nt], qa[kk], *(const u32 *)row, *(const u32 *)(row + 8));
      }
    }
    if (k0 + FLASH_BK > tk) {
#pragma unroll
      for (int nt = 0; nt < FLASH_BK / 8; nt++)
#pragma unroll
        for (int j = 0; j < 4; j++)
          if (k0 + nt * 8 + 2 * t + (j & 1) >= tk) s[nt][j] = __int_as_float(0xff800000);
    }

    float mx0 = m0, mx1 = m1;
#pragma unroll
    for (int nt = 0; nt < FLASH_BK / 8; nt++) {
      mx0 = fmaxf(mx0, fmaxf(s[nt][0], s[nt][1]));
      mx1 = fmaxf(mx1, fmaxf(s[nt][2], s[nt][3]));
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(FLASH_FULL, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(FLASH_FULL, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(FLASH_FULL, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(FLASH_FULL, mx1, 2));
    // Every tile holds at least one key, so mx is finite; exp2(-inf) = 0 rescales the first tile.
    const float c0 = exp2f((m0 - mx0) * scale_log2), c1 = exp2f((m1 - mx1) * scale_log2);
    m0 = mx0;
    m1 = mx1;
    const float ms0 = mx0 * scale_log2, ms1 = mx1 * scale_log2;
    float rs0 = 0.0f, rs1 = 0.0f;
#pragma unroll
    for (int nt = 0; nt < FLASH_BK / 8; nt++) {
      s[nt][0] = exp2f(fmaf(s[nt][0], scale_log2, -ms0));
      s[nt][1] = exp2f(fmaf(s[nt][1], scale_log2, -ms0));
      s[nt][2] = exp2f(fmaf(s[nt][2], scale_log2, -ms1));
      s[nt][3] = exp2f(fmaf(s[nt][3], scale_log2, -ms1));
      rs0 += s[nt][0] + s[nt][1];
      rs1 += s[nt][2] + s[nt][3];
    }
    l0 = l0 * c0 + rs0;
    l1 = l1 * c1 + rs1;
#pragma unroll
    for (int dn = 0; dn < HDP / 8; dn++) {
      o[dn][0] *= c0;
      o[dn][1] *= c0;
      o[dn][2] *= c1;
      o[dn][3] *= c1;
    }
    // The scores' accumulator fragments of two adjacent 8-key tiles are, element for element, the
    // A fragment of a 16-key step of P·V.
#pragma unroll
    for (int kk = 0; kk < FLASH_BK / 16; kk++) {
      const u32 pa[4] = {Tc<BF16>::pack(s[2 * kk][0], s[2 * kk][1]), Tc<BF16>::pack(s[2 * kk][2], s[2 * kk][3]),
                         Tc<BF16>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                         Tc<BF16>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      // Matrices (keys 0-7 | 8-15) × (columns dn | dn + 1) of this 16-key step: B fragments of both.
      const u32 m = lane >> 3;
#pragma unroll
      for (int dn = 0; dn < HDP / 8; dn += 2) {
        u32 vb[4];
        ldsm_x4_trans(vb, &vt[(kk * 16 + (m & 1) * 8 + (lane & 7)) * KS + (dn + (m >> 1)) * 8]);
        Tc<BF16>::mma(o[dn], pa, vb[0], vb[1]);
        Tc<BF16>::mma(o[dn + 1], pa, vb[2], vb[3]);
      }
    }
    __syncthreads();
  }

  l0 += __shfl_xor_sync(FLASH_FULL, l0, 1);
  l0 += __shfl_xor_sync(FLASH_FULL, l0, 2);
  l1 += __shfl_xor_sync(FLASH_FULL, l1, 1);
  l1 += __shfl_xor_sync(FLASH_FULL, l1, 2);
  const float i0 = 1.0f / l0, i1 = 1.0f / l1;
  const u32 r0 = q0 + qr, r1 = r0 + 8;
#pragma unroll
  for (int dn = 0; dn < HDP / 8; dn++) {
    const u32 c = dn * 8 + 2 * t;
    if (c < hd) {
      if (r0 < tq) *(u32 *)(out + (size_t)r0 * o_rs + c) = Tc<BF16>::pack(o[dn][0] * i0, o[dn][1] * i0);
      if (r1 < tq) *(u32 *)(out + (size_t)r1 * o_rs + c) = Tc<BF16>::pack(o[dn][2] * i1, o[dn][3] * i1);
    }
  }
}

// Launched with 128 threads, grid (B · heads, ceil(Tq / 64)). q, k, v, out and the row strides
// even (u32 loads of element pairs), hd even and at most HDP; vec: q, k, v, hd and the row strides
// multiples of 8 elements (16-byte loads).
#define FLASH(NAME, BF16, HDP)                                                                             \
  extern "C" __global__ void __launch_bounds__(FLASH_THREADS)                                             \
      NAME(const u16 *q, const u16 *k, const u16 *v, u16 *out, u32 tq, u32 tk, u32 heads, u32 hd, u32 q_rs, \
           u32 kv_rs, u32 o_rs, float scale_log2, u32 vec) {                                              \
    flash_attention<BF16, HDP>(q, k, v, out, tq, tk, heads, hd, q_rs, kv_rs, o_rs, scale_log2, vec != 0);  \
  }
FLASH(flash_f16_32, false, 32)
FLASH(flash_f16_64, false, 64)
FLASH(flash_f16_96, false, 96)
FLASH(flash_f16_128, false, 128)
FLASH(flash_bf16_32, true, 32)
FLASH(flash_bf16_64, true, 64)
FLASH(flash_bf16_96, true, 96)
FLASH(flash_bf16_128, true, 128)

// f32 attention on CUDA cores, same scheme without tensor cores (exact f32 products and expf, as the
// unfused f32 ops): a block of 4 warps takes 32 queries (8 per warp) and walks the keys in tiles of
// 32; for the scores each lane takes one key of the tile, for P·V hd/32 output columns. The Q-Former's
// shapes: 32 queries over 32 (self) or 257 (cross) keys, head size 64.
#define ATT_BQ 32
#define ATT_BK 32

template <int DJ>
__device__ __forceinline__ void attention_f32(const float *q, const float *k, const float *v, float *out, u32 tq,
                                              u32 tk, u32 heads, u32 hd, u32 q_rs, u32 kv_rs, u32 o_rs,
                                              float scale) {
  const int HDP = DJ * 32;
  __shared__ __align__(16) float qs[ATT_BQ * HDP];
  __shared__ float ks[ATT_BK * (HDP + 1)];  // + 1: the 32 lanes' rows start in distinct banks
  __shared__ float vs[ATT_BK * HDP];
  __shared__ __align__(16) float ps[4 * 8 * ATT_BK];  // each warp's probabilities for its 8 queries
  const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const u32 b = blockIdx.x / heads, h = blockIdx.x % heads, q0 = blockIdx.y * ATT_BQ;
  q += (size_t)b * tq * q_rs + (size_t)h * hd;
  k += (size_t)b * tk * kv_rs + (size_t)h * hd;
  v += (size_t)b * tk * kv_rs + (size_t)h * hd;
  out += (size_t)b * tq * o_rs + (size_t)h * hd;
  for (u32 i = threadIdx.x; i < ATT_BQ * HDP; i += FLASH_THREADS) {
    const u32 r = i / HDP, c = i % HDP;
    qs[i] = (q0 + r < tq && c < hd) ? q[(size_t)(q0 + r) * q_rs + c] : 0.0f;
  }
  float o[8][DJ], m[8], l[8];
#pragma unroll
  for (int i = 0; i < 8; i++) {
    m[i] = __int_as_float(0xff800000);
    l[i] = 0.0f;
#pragma unroll
    for (int j = 0; j < DJ; j++) o[i][j] = 0.0f;
  }
  const float *qw = qs + warp * 8 * HDP;
  float *pw = ps + warp * 8 * ATT_BK;
  for (u32 k0 = 0; k0 < tk; k0 += ATT_BK) {
    __syncthreads();  // the last tile's readers are done (and the query tile is in)
    for (u32 i = threadIdx.x; i < ATT_BK * HDP; i += FLASH_THREADS) {
      const u32 r = i / HDP, c = i % HDP;
      const bool in = k0 + r < tk && c < hd;
      ks[r * (HDP + 1) + c] = in ? k[(size_t)(k0 + r) * kv_rs + c] : 0.0f;
      vs[i] = in ? v[(size_t)(k0 + r) * kv_rs + c] : 0.0f;
    }
    __syncthreads();
    float s[8];
#pragma unroll
    for (int i = 0; i < 8; i++) s[i] = 0.0f;
    const float *kr = ks + lane * (HDP + 1);
    // Four columns a step: the queries' (broadcast) reads as one 16-byte load each.
    for (int c = 0; c < HDP; c += 4) {
      const float k0c = kr[c], k1c = kr[c + 1], k2c = kr[c + 2], k3c = kr[c + 3];
#pragma unroll
      for (int i = 0; i < 8; i++) {
        const float4 qv = *(const float4 *)&qw[i * HDP + c];
        s[i] = fmaf(qv.w, k3c, fmaf(qv.z, k2c, fmaf(qv.y, k1c, fmaf(qv.x, k0c, s[i]))));
      }
    }
    const bool key = k0 + lane < tk;
#pragma unroll
    for (int i = 0; i < 8; i++) {
      const float t = key ? s[i] * scale : __int_as_float(0xff800000);
      float mx = t;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(FLASH_FULL, mx, off));
      const float mn = fmaxf(m[i], mx);  // finite: the tile holds at least one key
      const float c = expf(m[i] - mn), p = expf(t - mn);
      m[i] = mn;
      l[i] = l[i] * c + p;  // this lane's partial sum; the warp's are added at the end
#pragma unroll
      for (int j = 0; j < DJ; j++) o[i][j] *= c;
      pw[i * ATT_BK + lane] = p;
    }
    __syncwarp();
    for (int kk = 0; kk < ATT_BK; kk += 4) {
      float4 pv[8];
#pragma unroll
      for (int i = 0; i < 8; i++) pv[i] = *(const float4 *)&pw[i * ATT_BK + kk];
#pragma unroll
      for (int j = 0; j < DJ; j++) {
        const float *vc = vs + kk * HDP + lane + 32 * j;
        const float v0 = vc[0], v1 = vc[HDP], v2 = vc[2 * HDP], v3 = vc[3 * HDP];
#pragma unroll
        for (int i = 0; i < 8; i++)
          o[i][j] = fmaf(pv[i].w, v3, fmaf(pv[i].z, v2, fmaf(pv[i].y, v1, fmaf(pv[i].x, v0, o[i][j]))));
      }
    }
    __syncwarp();
  }
#pragma unroll
  for (int i = 0; i < 8; i++) {
    float sum = l[i];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(FLASH_FULL, sum, off);
    const u32 row = q0 + warp * 8 + i;
    if (row < tq) {
      const float inv = 1.0f / sum;
#pragma unroll
      for (int j = 0; j < DJ; j++)
        if (lane + 32 * j < hd) out[(size_t)row * o_rs + lane + 32 * j] = o[i][j] * inv;
    }
  }
}

// Launched with 128 threads, grid (B · heads, ceil(Tq / 32)); hd at most 32 · DJ.
#define ATTENTION_F32(NAME, DJ)                                                                                  \
  extern "C" __global__ void __launch_bounds__(FLASH_THREADS)                                                   \
      NAME(const float *q, const float *k, const float *v, float *out, u32 tq, u32 tk, u32 heads, u32 hd, u32 q_rs, \
           u32 kv_rs, u32 o_rs, float scale) {                                                                  \
    attention_f32<DJ>(q, k, v, out, tq, tk, heads, hd, q_rs, kv_rs, o_rs, scale);                                 \
  }
ATTENTION_F32(attention_f32_32, 1)
ATTENTION_F32(attention_f32_64, 2)
ATTENTION_F32(attention_f32_96, 3)
