// Runs src/flash_attention.cu on the CPU: each block's 128 threads are OS threads, __syncthreads a
// barrier, and the warp instructions (shuffles, mma.sync m16n8k16, the f16x2 / bf16x2 packing)
// are emulated from the PTX ISA's definitions (fragment layouts: "Matrix Fragments for
// mma.m16n8k16 with floating point type"). The kernel's own code (tiling, masking, online softmax,
// fragment reuse, addressing, stores) runs as written. Checked against attention in f64 on the
// same half-precision inputs; exits 1 with the case's numbers where it is off.
//
// Built and run by tests/flash_emulation.rs: c++ -std=c++20 -O2 -fno-strict-aliasing -pthread.
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#define BLIPDEX_EMULATE
typedef uint16_t u16;
typedef uint32_t u32;
#define __device__
#define __forceinline__ inline
#define __global__
#define __launch_bounds__(n)
#define __shared__ static  // blocks run one at a time
#define __align__(n) __attribute__((aligned(n)))

struct __attribute__((aligned(16))) float4 {
  float x, y, z, w;
};
struct __attribute__((aligned(16))) uint4 {
  u32 x, y, z, w;
};

struct Dim3 {
  u32 x, y, z;
};
static thread_local Dim3 threadIdx;
static Dim3 blockIdx, blockDim;

static std::barrier<> *block_sync;
static std::barrier<> *warp_sync[4];
static void __syncthreads() { block_sync->arrive_and_wait(); }

static float __int_as_float(u32 u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static u32 float_bits(float f) {
  u32 u;
  std::memcpy(&u, &f, 4);
  return u;
}

// Per warp: each lane's operands, published between two barriers.
struct Exchange {
  float f[32];
  u32 a[32][4], b[32][2];
};
static Exchange exchange[4];

static void __syncwarp() { warp_sync[threadIdx.x >> 5]->arrive_and_wait(); }

static float __shfl_xor_sync(u32, float v, int mask) {
  const u32 w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  exchange[w].f[lane] = v;
  warp_sync[w]->arrive_and_wait();
  const float r = exchange[w].f[lane ^ mask];
  warp_sync[w]->arrive_and_wait();
  return r;
}

static float half_value(bool bf16, u16 h) {
  if (bf16) return __int_as_float((u32)h << 16);
  _Float16 x;
  std::memcpy(&x, &h, 2);
  return (float)x;
}
static u16 half_bits(bool bf16, float f) {
  if (bf16) {
    const u32 u = float_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
    return (u16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  const _Float16 x = (_Float16)f;  // round to nearest even
  u16 h;
  std::memcpy(&h, &x, 2);
  return h;
}

template <bool BF16> struct Tc {
  // D = A·B + C for the warp: A 16×16 (row), B 16×8 (col), C/D 16×8 f32.
  static void mma(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    const u32 w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    Exchange &x = exchange[w];
    std::memcpy(x.a[lane], a, sizeof a);
    x.b[lane][0] = b0;
    x.b[lane][1] = b1;
    warp_sync[w]->arrive_and_wait();
    auto elem = [&](u32 reg, int half) { return (u16)(reg >> (16 * half)); };
    // A element (row, col) lives in lane (row % 8)·4 + (col % 8)/2, register (row ≥ 8) + 2·(col ≥ 8).
    auto A = [&](int row, int col) {
      return half_value(BF16, elem(x.a[(row % 8) * 4 + (col % 8) / 2][(row >= 8) + 2 * (col >= 8)], col & 1));
    };
    // B element (k, n) lives in lane n·4 + (k % 8)/2, register (k ≥ 8).
    auto B = [&](int kk, int n) { return half_value(BF16, elem(x.b[n * 4 + (kk % 8) / 2][kk >= 8], kk & 1)); };
    const int g = lane >> 2, t = lane & 3;
    float r[4];
    for (int i = 0; i < 4; i++) {
      const int row = g + 8 * (i >= 2), col = 2 * t + (i & 1);
      float acc = d[i];
      for (int kk = 0; kk < 16; kk++) acc += A(row, kk) * B(kk, col);
      r[i] = acc;
    }
    warp_sync[w]->arrive_and_wait();
    std::memcpy(d, r, sizeof r);
  }
  static u32 pack(float lo, float hi) { return (u32)half_bits(BF16, lo) | ((u32)half_bits(BF16, hi) << 16); }
};

// ldmatrix .x4 .trans: lane i gives row i % 8 of matrix i / 8 and receives elements
// (2·(i % 4), i / 4) and (2·(i % 4) + 1, i / 4) of matrix j in r[j].
static void ldsm_x4_trans(u32 (&r)[4], const u16 *row) {
  const u32 w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  static const u16 *rows[4][32];
  rows[w][lane] = row;
  warp_sync[w]->arrive_and_wait();
  const u32 g = lane >> 2, t = lane & 3;
  u32 out[4];
  for (int j = 0; j < 4; j++) {
    const u16 *const *m = rows[w] + 8 * j;  // the matrix's 8 row addresses
    out[j] = (u32)m[2 * t][g] | ((u32)m[2 * t + 1][g] << 16);
  }
  warp_sync[w]->arrive_and_wait();
  std::memcpy(r, out, sizeof out);
}

#include "../../src/flash_attention.cu"

typedef void (*HalfKernel)(const u16 *, const u16 *, const u16 *, u16 *, u32, u32, u32, u32, u32, u32, u32, float,
                           u32);
typedef void (*F32Kernel)(const float *, const float *, const float *, float *, u32, u32, u32, u32, u32, u32, u32,
                          float);

// Runs body() as each block's 128 threads, one block at a time.
template <class F> static void launch(u32 gx, u32 gy, F body) {
  blockDim = {128, 1, 1};
  std::barrier<> block(128);
  std::barrier<> w0(32), w1(32), w2(32), w3(32);
  block_sync = &block;
  warp_sync[0] = &w0;
  warp_sync[1] = &w1;
  warp_sync[2] = &w2;
  warp_sync[3] = &w3;
  for (u32 by = 0; by < gy; by++)
    for (u32 bx = 0; bx < gx; bx++) {
      blockIdx = {bx, by, 0};
      std::vector<std::thread> threads;
      for (u32 i = 0; i < 128; i++)
        threads.emplace_back([=] {
          threadIdx = {i, 0, 0};
          body();
        });
      for (auto &th : threads) th.join();
    }
}

enum Kind { F16, BF16, F32 };

struct Case {
  u32 batch, tq, tk, heads, hd;
  Kind kind;
  bool fused_qkv;  // q, k, v side by side in one [B, T, 3·D] projection (self-attention), else q apart
};

// Elements as stored (u16 halves or f32) and their values.
template <class T> static T store(Kind kind, float x);
template <> u16 store<u16>(Kind kind, float x) { return half_bits(kind == BF16, x); }
template <> float store<float>(Kind, float x) { return x; }
static float value(Kind kind, u16 h) { return half_value(kind == BF16, h); }
static float value(Kind, float x) { return x; }

template <class T> static bool run(const Case &c, std::mt19937 &rng) {
  if (c.fused_qkv && c.tq != c.tk) {
    std::printf("case error: self-attention with %u queries and %u keys\n", c.tq, c.tk);
    return false;
  }
  const u32 d = c.heads * c.hd;
  // The kernel's padded head size: multiples of 32 up to 128 (halves) or 96 (f32).
  const u32 padded = (c.hd + 31) / 32 * 32;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  // Self-attention reads q, k, v from one buffer; cross-attention q from its own and k, v from a
  // [B, Tk, 2·D] one, as the Q-Former's projections are laid out.
  const u32 q_rs = c.fused_qkv ? 3 * d : d, kv_rs = c.fused_qkv ? 3 * d : 2 * d;
  std::vector<T> qbuf((size_t)c.batch * c.tq * q_rs), kvbuf;
  for (auto &x : qbuf) x = store<T>(c.kind, 1.5f * normal(rng));
  const T *q = qbuf.data(), *k, *v;
  if (c.fused_qkv) {
    k = q + d;
    v = q + 2 * d;
  } else {
    kvbuf.resize((size_t)c.batch * c.tk * kv_rs);
    for (auto &x : kvbuf) x = store<T>(c.kind, 1.5f * normal(rng));
    k = kvbuf.data();
    v = kvbuf.data() + d;
  }
  const u32 o_rs = d;
  std::vector<T> out((size_t)c.batch * c.tq * o_rs, store<T>(c.kind, NAN));  // rows left unwritten show
  const double scale = 1.0 / std::sqrt((double)c.hd);
  // 16-byte loads where cuda_flash.rs takes them: offsets, head size and row strides multiples of 8.
  const bool vec = c.hd % 8 == 0 && q_rs % 8 == 0 && kv_rs % 8 == 0;
  T *o = out.data();
  if constexpr (sizeof(T) == 2) {
    static const HalfKernel kernels[2][4] = {{flash_f16_32, flash_f16_64, flash_f16_96, flash_f16_128},
                                             {flash_bf16_32, flash_bf16_64, flash_bf16_96, flash_bf16_128}};
    const HalfKernel kernel = kernels[c.kind == BF16][padded / 32 - 1];
    const float scale_log2 = (float)(scale * 1.4426950408889634);
    launch(c.batch * c.heads, (c.tq + 63) / 64, [=] {
      kernel(q, k, v, o, c.tq, c.tk, c.heads, c.hd, q_rs, kv_rs, o_rs, scale_log2, vec);
    });
  } else {
    static const F32Kernel kernels[3] = {attention_f32_32, attention_f32_64, attention_f32_96};
    const F32Kernel kernel = kernels[padded / 32 - 1];
    launch(c.batch * c.heads, (c.tq + 31) / 32,
           [=] { kernel(q, k, v, o, c.tq, c.tk, c.heads, c.hd, q_rs, kv_rs, o_rs, (float)scale); });
  }

  double worst = 0.0;
  std::vector<double> p(c.tk);
  for (u32 b = 0; b < c.batch; b++)
    for (u32 h = 0; h < c.heads; h++)
      for (u32 i = 0; i < c.tq; i++) {
        const T *qi = q + ((size_t)b * c.tq + i) * q_rs + h * c.hd;
        double m = -INFINITY, sum = 0.0;
        for (u32 j = 0; j < c.tk; j++) {
          const T *kj = k + ((size_t)b * c.tk + j) * kv_rs + h * c.hd;
          double s = 0.0;
          for (u32 e = 0; e < c.hd; e++) s += (double)value(c.kind, qi[e]) * value(c.kind, kj[e]);
          p[j] = s * scale;
          m = std::max(m, p[j]);
        }
        for (u32 j = 0; j < c.tk; j++) sum += (p[j] = std::exp(p[j] - m));
        for (u32 e = 0; e < c.hd; e++) {
          double o = 0.0;
          for (u32 j = 0; j < c.tk; j++)
            o += p[j] / sum * value(c.kind, v[((size_t)b * c.tk + j) * kv_rs + h * c.hd + e]);
          const double got = value(c.kind, out[((size_t)b * c.tq + i) * o_rs + h * c.hd + e]);
          const double diff = std::isnan(got) ? INFINITY : std::fabs(got - o);
          worst = std::max(worst, diff);
        }
      }
  // Half precision: its rounding of the probabilities and the output, a few units in the last place
  // of values of order 1. f32: the unfused f32 ops' own error.
  const double tol = c.kind == BF16 ? 2e-2 : c.kind == F16 ? 3e-3 : 1e-5;
  const bool ok = worst <= tol;
  static const char *names[] = {"f16", "bf16", "f32"};
  std::printf("%s %-4s B=%u Tq=%u Tk=%u heads=%u hd=%u (kernel for %u%s): max |diff| %.3g (tolerance %.0e)%s\n",
              c.fused_qkv ? "self " : "cross", names[c.kind], c.batch, c.tq, c.tk, c.heads, c.hd, padded,
              c.kind != F32 && vec ? ", 16-byte loads" : "", worst, tol, ok ? "" : "  FAILED");
  return ok;
}

int main() {
  std::mt19937 rng(7);
  // Tensor cores (f16, bf16): the base ViT's shape (257 tokens, head size 64), ViT-g's head size 88,
  // sequences on, off and below the 64-row tiles, every padded head size, cross-attention (32
  // queries over 257 keys), head sizes off the 16-byte loads (12, 18: element pairs). CUDA cores (f32): the Q-Former's self- and cross-attention, query
  // counts off the 32-row tiles, head sizes 1 to 96.
  const Case cases[] = {
      {2, 257, 257, 3, 64, F16, true},  {2, 257, 257, 3, 64, BF16, true}, {1, 70, 70, 2, 88, F16, true},
      {1, 70, 70, 2, 88, BF16, true},   {1, 64, 64, 2, 32, F16, true},    {1, 5, 5, 3, 8, BF16, true},
      {1, 130, 130, 1, 128, F16, true}, {1, 65, 65, 2, 12, F16, true},    {2, 32, 257, 2, 64, F16, false},
      {1, 32, 100, 2, 18, BF16, false}, {2, 32, 32, 3, 64, F32, true},    {2, 32, 257, 2, 64, F32, false},
      {1, 45, 70, 2, 96, F32, false},   {1, 33, 33, 3, 24, F32, true},     {1, 40, 40, 2, 1, F32, true},
  };
  bool ok = true;
  for (const Case &c : cases) ok &= c.kind == F32 ? run<float>(c, rng) : run<u16>(c, rng);
  return ok ? 0 : 1;
}
