// CPU per-sample Fisher, tiled so that per-sample gradients never exist in memory.
//
// The output [M, K] is cut into blocks of up to kMb x kKb, each OpenMP thread owning a
// fixed range of blocks. Threads loop over samples; for each sample and block a
// thread packs chunks of kTc token rows of D_n[:, block] and X_n[:, block] into
// zero-padded panels (this is where strides, layouts and bfloat16 are resolved, so the
// microkernel only sees contiguous float panels), accumulates G = D_n^T X_n for the
// block with a register-blocked MR x NR microkernel, and on the last chunk writes each
// G tile from the registers: squared into the Fisher block, added into dW, its squared
// sum into the sample's norm. The extra memory is one block of G and two panels per
// thread, whatever N and T.
//
// T == 1 (one token per sample) is a special case: then sum_n (d_n x_n^T)^2 =
// (D∘D)^T (X∘X), a single GEMM over samples, so samples become the reduction
// rows and the packing squares the values; squaring per sample would make the
// kernel memory-bound on the Fisher block.
//
// Microkernels: AVX-512 and AVX2+FMA intrinsics selected at run time (never
// -march=native), and a portable C++ fallback.
#include "fisher.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "fq/multiversion.h"
#include "fq/quant_math.h"

namespace fq::cpu {
namespace {

constexpr int64_t MR = 8;    // microtile rows (output features m)
constexpr int64_t NR = 32;   // microtile columns (input features k): two AVX-512 vectors
constexpr int64_t kMb = 256;  // largest block of m: its packed D chunk (kTc x kMb, 128 KiB) stays in L2
constexpr int64_t kKb = 512;  // largest block of k: with G (kMb x kKb) and the X chunk, ~0.9 MiB of L2
constexpr int64_t kTc = 128;  // packed rows per chunk: an X micro-panel (kTc x NR, 16 KiB) stays in L1
constexpr int64_t kSampleChunk = 1024;  // T == 1: samples summed in float before each store

// Where a finished full MR x NR tile of G goes when the microkernel writes it out itself
// (float32 outputs, last chunk of a sample): fisher (+)= G^2, grad (+)= G, *sq += ||G||^2,
// each optional. Saves a store and re-read of G per tile, which matter for short samples.
struct TileOutputs {
  float* fisher;
  float* grad;
  int64_t ld;  // row stride of fisher and grad
  bool fisher_add, grad_add;
  double* sq;
};

// The portable form of that epilogue, from a G tile in memory (row stride ldg); defined
// with the other epilogues below.
void write_tile(const float* g, int64_t ldg, const TileOutputs& o);

// g[MR x NR] (row stride ldg) = (load ? g : 0) + sum_r dp[r, :]^T xp[r, :], where dp is
// a packed [rows][MR] panel and xp a packed [rows][NR] panel; with `out`, the tile goes
// to those outputs instead of g.
using Microkernel = void (*)(int64_t rows, const float* dp, const float* xp, float* g, int64_t ldg, bool load,
                             const TileOutputs* out);

#if defined(__x86_64__) && defined(__GNUC__)
// 8 x 32 floats = 16 zmm accumulators: enough independent FMA chains to hide the
// FMA latency on two pipes, with 2 vector loads + 8 broadcasts per 16 FMAs.
__attribute__((target("avx512f"))) void micro_avx512(int64_t rows, const float* dp, const float* xp, float* g,
                                                     int64_t ldg, bool load, const TileOutputs* out) {
  __m512 c[MR][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    c[r][0] = load ? _mm512_loadu_ps(g + r * ldg) : _mm512_setzero_ps();
    c[r][1] = load ? _mm512_loadu_ps(g + r * ldg + 16) : _mm512_setzero_ps();
  }
  for (int64_t t = 0; t < rows; ++t) {
    const __m512 x0 = _mm512_loadu_ps(xp + t * NR), x1 = _mm512_loadu_ps(xp + t * NR + 16);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(dp[t * MR + r]);
      c[r][0] = _mm512_fmadd_ps(a, x0, c[r][0]);
      c[r][1] = _mm512_fmadd_ps(a, x1, c[r][1]);
    }
  }
  if (!out) {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      _mm512_storeu_ps(g + r * ldg, c[r][0]);
      _mm512_storeu_ps(g + r * ldg + 16, c[r][1]);
    }
    return;
  }
  __m512 sq = _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const __m512 s0 = _mm512_mul_ps(c[r][0], c[r][0]), s1 = _mm512_mul_ps(c[r][1], c[r][1]);
    if (out->fisher) {
      float* f = out->fisher + r * out->ld;
      _mm512_storeu_ps(f, out->fisher_add ? _mm512_add_ps(_mm512_loadu_ps(f), s0) : s0);
      _mm512_storeu_ps(f + 16, out->fisher_add ? _mm512_add_ps(_mm512_loadu_ps(f + 16), s1) : s1);
    }
    if (out->grad) {
      float* gw = out->grad + r * out->ld;
      _mm512_storeu_ps(gw, out->grad_add ? _mm512_add_ps(_mm512_loadu_ps(gw), c[r][0]) : c[r][0]);
      _mm512_storeu_ps(gw + 16, out->grad_add ? _mm512_add_ps(_mm512_loadu_ps(gw + 16), c[r][1]) : c[r][1]);
    }
    sq = _mm512_add_ps(sq, _mm512_add_ps(s0, s1));
  }
  if (out->sq) {
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, sq);
    double total = 0.0;
    for (float v : lanes) total += v;
    *out->sq += total;
  }
}

// AVX2 has 16 ymm registers: the 8 x 32 tile is done as four 4 x 16 quarters
// (8 accumulators each), re-reading the panels from L1.
__attribute__((target("avx2,fma"))) void micro_avx2(int64_t rows, const float* dp, const float* xp, float* g,
                                                     int64_t ldg, bool load, const TileOutputs* out) {
  for (int r0 = 0; r0 < MR; r0 += 4) {
    for (int c0 = 0; c0 < NR; c0 += 16) {
      __m256 c[4][2];
      for (int r = 0; r < 4; ++r) {
        float* gr = g + (r0 + r) * ldg + c0;
        c[r][0] = load ? _mm256_loadu_ps(gr) : _mm256_setzero_ps();
        c[r][1] = load ? _mm256_loadu_ps(gr + 8) : _mm256_setzero_ps();
      }
      for (int64_t t = 0; t < rows; ++t) {
        const __m256 x0 = _mm256_loadu_ps(xp + t * NR + c0), x1 = _mm256_loadu_ps(xp + t * NR + c0 + 8);
        for (int r = 0; r < 4; ++r) {
          const __m256 a = _mm256_broadcast_ss(dp + t * MR + r0 + r);
          c[r][0] = _mm256_fmadd_ps(a, x0, c[r][0]);
          c[r][1] = _mm256_fmadd_ps(a, x1, c[r][1]);
        }
      }
      for (int r = 0; r < 4; ++r) {
        float* gr = g + (r0 + r) * ldg + c0;
        _mm256_storeu_ps(gr, c[r][0]);
        _mm256_storeu_ps(gr + 8, c[r][1]);
      }
    }
  }
  if (out) write_tile(g, ldg, *out);
}
#endif

void micro_generic(int64_t rows, const float* dp, const float* xp, float* g, int64_t ldg, bool load,
                   const TileOutputs* out) {
  float c[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) c[r][j] = load ? g[r * ldg + j] : 0.0f;
  for (int64_t t = 0; t < rows; ++t)
    for (int r = 0; r < MR; ++r) {
      const float a = dp[t * MR + r];
      for (int j = 0; j < NR; ++j) c[r][j] += a * xp[t * NR + j];
    }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) g[r * ldg + j] = c[r][j];
  if (out) write_tile(g, ldg, *out);
}

// FQ_FISHER_ISA=avx2|generic caps the choice (so tests cover every microkernel on one machine).
Microkernel pick_microkernel() {
  const char* cap = std::getenv("FQ_FISHER_ISA");
  const std::string isa = cap ? cap : "";
  if (isa == "generic") return micro_generic;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (isa != "avx2" && __builtin_cpu_supports("avx512f")) return micro_avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return micro_avx2;
#endif
  return micro_generic;
}

inline float load_value(const float* p, int64_t i) { return p[i]; }
inline float load_value(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }

// Copies `n` values from src (element stride `stride`) to dst, squared when asked.
// Unit stride is the common case (a row of x or grad_out) and vectorises.
template <typename In>
FQ_MULTIVERSION void copy_row(const In* src, int64_t stride, int64_t n, bool square, float* dst) {
  if (stride == 1) {
    if (square)
      for (int64_t c = 0; c < n; ++c) { const float v = load_value(src, c); dst[c] = v * v; }
    else
      for (int64_t c = 0; c < n; ++c) dst[c] = load_value(src, c);
  } else {
    for (int64_t c = 0; c < n; ++c) {
      const float v = load_value(src, c * stride);
      dst[c] = square ? v * v : v;
    }
  }
}

// The common case of pack (contiguous rows, a panel width known at compile time): one
// call per chunk, with each row's panel pieces copied by unrolled vector loops.
template <typename In, int64_t W, bool Square>
FQ_MULTIVERSION void pack_rows(const In* src, int64_t row_stride, int64_t rows, int64_t cols, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const In* s = src + r * row_stride;
    for (int64_t p = 0; p * W < cols; ++p) {
      const int64_t cw = std::min(W, cols - p * W);
      float* o = out + (p * rows + r) * W;
      if (cw == W) {
        // Through a local array and memcpy: GCC then emits vector loads and stores (it
        // does not vectorise the direct element copy, as it cannot rule out aliasing).
        float v[W];
        if constexpr (std::is_same_v<In, float>)
          std::memcpy(v, s + p * W, sizeof(v));
        else
          for (int64_t c = 0; c < W; ++c) v[c] = load_value(s + p * W, c);
        if (Square)
          for (int64_t c = 0; c < W; ++c) v[c] *= v[c];
        std::memcpy(o, v, sizeof(v));
      } else {
        for (int64_t c = 0; c < W; ++c) {
          const float v = c < cw ? load_value(s + p * W, c) : 0.0f;
          o[c] = Square ? v * v : v;
        }
      }
    }
  }
}

// out[p][r][0:width] = src[r * row_stride + (p * width + c) * col_stride] (squared when
// `square`), for `cols` columns split into panels of `width` (MR or NR), zero padded.
// Column-major sources (conv's unfolded input viewed as [L, K]) are read down the
// columns, so that the reads stay contiguous.
template <typename In>
void pack(const In* src, int64_t row_stride, int64_t col_stride, int64_t rows, int64_t cols, int64_t width,
          bool square, float* out) {
  if (col_stride == 1) {
    if (width == MR)
      return square ? pack_rows<In, MR, true>(src, row_stride, rows, cols, out)
                    : pack_rows<In, MR, false>(src, row_stride, rows, cols, out);
    return square ? pack_rows<In, NR, true>(src, row_stride, rows, cols, out)
                  : pack_rows<In, NR, false>(src, row_stride, rows, cols, out);
  }
  const bool by_column = row_stride == 1;
  float column[kTc];
  for (int64_t p = 0; p * width < cols; ++p) {
    const int64_t cw = std::min(width, cols - p * width);
    float* o = out + p * rows * width;
    if (by_column) {
      for (int64_t c = 0; c < width; ++c) {
        if (c < cw) copy_row(src + (p * width + c) * col_stride, 1, rows, square, column);
        for (int64_t r = 0; r < rows; ++r) o[r * width + c] = c < cw ? column[r] : 0.0f;
      }
      continue;
    }
    for (int64_t r = 0; r < rows; ++r) {
      copy_row(src + r * row_stride + p * width * col_stride, col_stride, cw, square, o + r * width);
      for (int64_t c = cw; c < width; ++c) o[r * width + c] = 0.0f;
    }
  }
}

// Epilogues on the valid [mb, kb] part of a G block (row stride ldg) into the
// [M, K] output at row m0, column k0 (row stride ldo): out (+)= G^2 or G.
template <typename Out>
FQ_MULTIVERSION void store_block(const float* g, int64_t ldg, Out* out, int64_t ldo, int64_t mb, int64_t kb,
                                 bool square, bool add) {
  for (int64_t r = 0; r < mb; ++r) {
    const float* gr = g + r * ldg;
    Out* o = out + r * ldo;
    for (int64_t c = 0; c < kb; ++c) {
      const Out v = square ? static_cast<Out>(gr[c]) * static_cast<Out>(gr[c]) : static_cast<Out>(gr[c]);
      o[c] = add ? o[c] + v : v;
    }
  }
}

FQ_MULTIVERSION double block_sq_sum(const float* g, int64_t ldg, int64_t mb, int64_t kb) {
  double total = 0.0;
  for (int64_t r = 0; r < mb; ++r) {
    float row = 0.0f;
    for (int64_t c = 0; c < kb; ++c) row += g[r * ldg + c] * g[r * ldg + c];
    total += row;
  }
  return total;
}

void write_tile(const float* g, int64_t ldg, const TileOutputs& o) {
  if (o.fisher) store_block(g, ldg, o.fisher, o.ld, MR, NR, true, o.fisher_add);
  if (o.grad) store_block(g, ldg, o.grad, o.ld, MR, NR, false, o.grad_add);
  if (o.sq) *o.sq += block_sq_sum(g, ldg, MR, NR);
}

void store_output(const float* g, int64_t ldg, void* out, bool f64, int64_t ldo, int64_t m0, int64_t k0,
                  int64_t mb, int64_t kb, bool square, bool add) {
  if (f64)
    store_block(g, ldg, static_cast<double*>(out) + m0 * ldo + k0, ldo, mb, kb, square, add);
  else
    store_block(g, ldg, static_cast<float*>(out) + m0 * ldo + k0, ldo, mb, kb, square, add);
}

// Block shape for an [m, k] output: the largest blocks up to kMb x kKb (each packed
// element then serves bk / NR or bm / MR microtiles, and a sample's X and D are read
// from memory fewer times), halved only as far as the static split over threads needs.
struct Blocking {
  int64_t bm, bk, mblocks, kblocks;
};

Blocking choose_blocks(int64_t m, int64_t k, int threads) {
  auto round_up = [](int64_t v, int64_t q) { return std::max<int64_t>(q, (v + q - 1) / q * q); };
  Blocking b{std::min(kMb, round_up(m, MR)), std::min(kKb, round_up(k, NR)), 0, 0};
  auto count = [&] { return ((m + b.bm - 1) / b.bm) * ((k + b.bk - 1) / b.bk); };
  // Halve until the blocks split evenly over the threads, or there are at least two per
  // thread (then an uneven split costs at most a third); not further: smaller blocks
  // repack each sample's D and X more often.
  auto balanced = [&] { return count() >= 2 * threads || count() % threads == 0; };
  while (!balanced() && (b.bm > MR || b.bk > NR)) {
    if (b.bk > NR && (b.bk >= b.bm || b.bm <= MR)) b.bk = round_up(b.bk / 2, NR);
    else b.bm = round_up(b.bm / 2, MR);
  }
  b.mblocks = std::max<int64_t>(1, (m + b.bm - 1) / b.bm);
  b.kblocks = std::max<int64_t>(1, (k + b.bk - 1) / b.bk);
  return b;
}

struct Workspace {
  std::vector<float> dpack = std::vector<float>(kMb * kTc);
  std::vector<float> xpack = std::vector<float>(kKb * kTc);
  std::vector<float> g = std::vector<float>(kMb * kKb);  // one block of G, row stride bk
};

// G[0:mb, 0:kb] (w.g, row stride ldg) = sum over `rows` reduction rows of D^T X: the
// tokens of one sample (d and x point at it) or, with T == 1, samples (squared). Each
// chunk of kTc rows is packed once and serves every microtile of the block; microtiles
// go along m for a fixed X panel, which stays in L1. For each finished MR x NR tile at
// block offset (r, c), direct(r, c, out) may name the outputs the microkernel writes it
// to (returning true); otherwise tile_done(r, c) runs on it while it is still in L1.
template <typename In, typename Direct, typename TileDone>
void accumulate_rows(Microkernel micro, Workspace& w, const In* d, int64_t d_row, int64_t d_col, const In* x,
                     int64_t x_row, int64_t x_col, int64_t rows, int64_t mb, int64_t kb, int64_t ldg, bool square,
                     Direct&& direct, TileDone&& tile_done) {
  if (rows == 0) std::fill(w.g.begin(), w.g.end(), 0.0f);
  for (int64_t r0 = 0; r0 < std::max<int64_t>(rows, 1); r0 += kTc) {
    const int64_t rc = std::min(kTc, rows - r0);
    if (rc > 0) {
      pack(d + r0 * d_row, d_row, d_col, rc, mb, MR, square, w.dpack.data());
      pack(x + r0 * x_row, x_row, x_col, rc, kb, NR, square, w.xpack.data());
    }
    const bool last = r0 + kTc >= rows;
    for (int64_t j = 0; j * NR < kb; ++j)
      for (int64_t i = 0; i * MR < mb; ++i) {
        TileOutputs out;
        const bool written = last && rc > 0 && direct(i * MR, j * NR, out);
        if (rc > 0)
          micro(rc, w.dpack.data() + i * rc * MR, w.xpack.data() + j * rc * NR, w.g.data() + i * MR * ldg + j * NR,
                ldg, r0 > 0, written ? &out : nullptr);
        if (last && !written) tile_done(i * MR, j * NR);
      }
  }
}

// One block of the [M, K] output: rows m0 .. m0 + mb, columns k0 .. k0 + kb.
struct Block {
  int64_t m0, k0, mb, kb;
};

Block block_at(const FisherArgs& a, const Blocking& blk, int64_t bi, int64_t bj) {
  const int64_t m0 = bi * blk.bm, k0 = bj * blk.bk;
  return {m0, k0, std::min(blk.bm, a.m - m0), std::min(blk.bk, a.k - k0)};
}

// Writes the valid part of the G tile at offset (r, c) of block b (w.g, row stride ldg)
// into the outputs: the Fisher gets G^2 when `square` (G when the packing already squared).
void store_tile(const FisherArgs& a, const Workspace& w, int64_t ldg, const Block& b, int64_t r, int64_t c,
                bool square, bool f_add, bool g_add, bool fisher, bool grad) {
  const int64_t tm = std::min(MR, b.mb - r), tk = std::min(NR, b.kb - c);
  const float* g = w.g.data() + r * ldg + c;
  if (fisher && a.fisher)
    store_output(g, ldg, a.fisher, a.fisher_f64, a.k, b.m0 + r, b.k0 + c, tm, tk, square, a.fisher_accumulate || f_add);
  if (grad && a.grad_weight)
    store_output(g, ldg, a.grad_weight, a.grad_f64, a.k, b.m0 + r, b.k0 + c, tm, tk, false,
                 a.grad_accumulate || g_add);
}

// T > 1, run by every thread of the parallel region. Samples are the outer loop, so each
// sample's X_n and D_n are read from memory once per block row / column and then reused
// from cache. Each thread owns a fixed range of blocks: no two threads write one block,
// so no barrier per sample is needed (barriers stall when other processes share the
// cores). sq: this thread's partial squared norms [N], or nullptr.
template <typename In>
void sum_samples(const FisherArgs& a, Microkernel micro, const Blocking& blk, Workspace& w, double* sq) {
  const In* x = static_cast<const In*>(a.x);
  const In* d = static_cast<const In*>(a.d);
  const int64_t ldg = blk.bk, blocks = blk.mblocks * blk.kblocks;
  const int64_t nth = omp_get_num_threads(), tid = omp_get_thread_num();
  const bool empty = a.n == 0;  // nothing to sum: still define the written outputs (as zeros)
  for (int64_t n = 0; n < std::max<int64_t>(a.n, 1); ++n) {
    for (int64_t i = blocks * tid / nth; i < blocks * (tid + 1) / nth; ++i) {
      const Block b = block_at(a, blk, i / blk.kblocks, i % blk.kblocks);
      // Full tiles with float32 outputs are written by the microkernel from its registers.
      auto direct = [&](int64_t r, int64_t c, TileOutputs& out) {
        if (r + MR > b.mb || c + NR > b.kb || a.fisher_f64 || a.grad_f64) return false;
        const int64_t at = (b.m0 + r) * a.k + b.k0 + c;
        out = {a.fisher ? static_cast<float*>(a.fisher) + at : nullptr,
               a.grad_weight ? static_cast<float*>(a.grad_weight) + at : nullptr, a.k,
               a.fisher_accumulate || n > 0, a.grad_accumulate || n > 0, sq ? sq + n : nullptr};
        return true;
      };
      auto tile_done = [&](int64_t r, int64_t c) {
        store_tile(a, w, ldg, b, r, c, !empty, n > 0, n > 0, true, true);
        if (sq && !empty)
          sq[n] += block_sq_sum(w.g.data() + r * ldg + c, ldg, std::min(MR, b.mb - r), std::min(NR, b.kb - c));
      };
      accumulate_rows(micro, w, d + n * a.ds_n + b.m0 * a.ds_m, a.ds_t, a.ds_m, x + n * a.xs_n + b.k0 * a.xs_k,
                      a.xs_t, a.xs_k, empty ? 0 : a.t, b.mb, b.kb, ldg, false, direct, tile_done);
    }
  }
}

// T == 1, a work-sharing loop inside the parallel region: samples are the reduction rows
// and the Fisher's packing squares the values, so G is the Fisher itself, summed over
// chunks of kSampleChunk samples, each stored in the output's dtype (float64 outputs
// then accumulate the sum over samples in double here too).
template <typename In>
void sum_single_tokens(const FisherArgs& a, Microkernel micro, const Blocking& blk, Workspace& w) {
  const In* x = static_cast<const In*>(a.x);
  const In* d = static_cast<const In*>(a.d);
  const int64_t ldg = blk.bk;
  auto no_direct = [](int64_t, int64_t, TileOutputs&) { return false; };
#pragma omp for collapse(2) schedule(dynamic)
  for (int64_t bi = 0; bi < blk.mblocks; ++bi) {
    for (int64_t bj = 0; bj < blk.kblocks; ++bj) {
      const Block b = block_at(a, blk, bi, bj);
      for (int64_t r0 = 0; r0 < std::max<int64_t>(a.n, 1); r0 += kSampleChunk) {
        const int64_t rc = std::min(kSampleChunk, a.n - r0);
        const In* db = d + r0 * a.ds_n + b.m0 * a.ds_m;
        const In* xb = x + r0 * a.xs_n + b.k0 * a.xs_k;
        auto fisher_done = [&](int64_t r, int64_t c) {
          store_tile(a, w, ldg, b, r, c, false, r0 > 0, false, true, false);
        };
        auto grad_done = [&](int64_t r, int64_t c) {
          store_tile(a, w, ldg, b, r, c, false, false, r0 > 0, false, true);
        };
        if (a.fisher)
          accumulate_rows(micro, w, db, a.ds_n, a.ds_m, xb, a.xs_n, a.xs_k, rc, b.mb, b.kb, ldg, true, no_direct,
                          fisher_done);
        if (a.grad_weight)
          accumulate_rows(micro, w, db, a.ds_n, a.ds_m, xb, a.xs_n, a.xs_k, rc, b.mb, b.kb, ldg, false, no_direct,
                          grad_done);
      }
    }
  }
}

// sq_norms[n]: the threads' partial sums (T > 1), or ||d_n||^2 ||x_n||^2 (T == 1, as
// ||d_n x_n^T||^2 = ||d_n||^2 ||x_n||^2).
template <typename In>
void write_sq_norms(const FisherArgs& a, const std::vector<double>& partial, int threads) {
  const In* x = static_cast<const In*>(a.x);
  const In* d = static_cast<const In*>(a.d);
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < a.n; ++n) {
    double v = 0.0;
    if (a.t != 1) {
      for (int th = 0; th < threads; ++th) v += partial[static_cast<size_t>(th) * a.n + n];
    } else {
      double dd = 0.0, xx = 0.0;
      for (int64_t i = 0; i < a.m; ++i) { const double e = load_value(d + n * a.ds_n, i * a.ds_m); dd += e * e; }
      for (int64_t i = 0; i < a.k; ++i) { const double e = load_value(x + n * a.xs_n, i * a.xs_k); xx += e * e; }
      v = dd * xx;
    }
    if (a.sq_f64) static_cast<double*>(a.sq_norms)[n] = v;
    else static_cast<float*>(a.sq_norms)[n] = static_cast<float>(v);
  }
}

template <typename In>
void run(const FisherArgs& a) {
  const Microkernel micro = pick_microkernel();
  const int threads = omp_get_max_threads();
  const Blocking blk = choose_blocks(a.m, a.k, threads);
  const bool per_token = a.t != 1;
  // Per-thread partial squared norms: no atomics, and each thread sums in a fixed order.
  std::vector<double> partial(a.sq_norms && per_token ? static_cast<size_t>(threads) * a.n : 0, 0.0);
#pragma omp parallel
  {
    Workspace w;
    if (per_token)
      sum_samples<In>(a, micro, blk, w,
                      partial.empty() ? nullptr : partial.data() + static_cast<size_t>(omp_get_thread_num()) * a.n);
    else
      sum_single_tokens<In>(a, micro, blk, w);
  }
  if (a.sq_norms) write_sq_norms<In>(a, partial, threads);
}

}  // namespace

void per_sample_fisher(const FisherArgs& a) {
  if (a.bf16) run<uint16_t>(a);
  else run<float>(a);
}

}  // namespace fq::cpu
