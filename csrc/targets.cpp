// Density and structure targets of uint8 RGB images, one fused pass per band of patch rows.
//
// Exact definition (shared with uno_engine.targets, whose torch and numpy versions compute the same):
//   Y = (0.299 R + 0.587 G + 0.114 B) / 255                    luminance on [0, 1]
//   borders replicate (Y[-1] = Y[0], Y[H] = Y[H-1], same for columns)
//   density:   e = (Y[r][c+1] - Y[r][c])^2 + (Y[r+1][c] - Y[r][c])^2          forward differences
//   structure: s = sqrt(Gx^2 + Gy^2), Gx, Gy the 3x3 Sobel responses divided by 8
//              Gx = ((Yu[c+1]-Yu[c-1]) + 2 (Yc[c+1]-Yc[c-1]) + (Yd[c+1]-Yd[c-1])) / 8   (u/c/d: rows r-1, r, r+1)
//              Gy = ((Yd[c-1]-Yu[c-1]) + 2 (Yd[c]-Yu[c]) + (Yd[c+1]-Yu[c+1])) / 8
//   grid gh x gw: cell (a, b) covers rows [floor(a H / gh), floor((a+1) H / gh)) and columns
//              [floor(b W / gw), floor((b+1) W / gw)): a partition, cell sizes differ by at most one;
//              the target is the mean of e (or s) over the cell; output row-major (a * gw + b).
//
// Work split: one task per (image, row of cells), OpenMP dynamic schedule. A task computes the luminance
// of its rows plus one halo row each side once into a (rows + 2) x (W + 2) buffer (L2-resident), then per
// row the per-pixel values (SIMD) and per cell the row segment sums (float within a row, double across
// rows).

#include "targets.h"

#include <algorithm>
#include <cmath>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

// The hot loops are compiled twice, for AVX2 and the baseline, and picked at load time (GCC/Clang function
// multiversioning), so a portable build still runs 32-byte vectors where the CPU has them.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(UNO_NO_TARGET_CLONES)
#define UNO_TARGET_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define UNO_TARGET_CLONES
#endif

namespace uno {
namespace {

inline void luma_row(const uint8_t* px, int64_t W, float* y) {
  // y has W + 2 entries: y[1..W] the row, y[0] and y[W+1] the replicated borders
  const float kr = 0.299f / 255.0f, kg = 0.587f / 255.0f, kb = 0.114f / 255.0f;
#pragma omp simd
  for (int64_t c = 0; c < W; ++c) {
    y[c + 1] = kr * static_cast<float>(px[3 * c]) + kg * static_cast<float>(px[3 * c + 1]) +
               kb * static_cast<float>(px[3 * c + 2]);
  }
  y[0] = y[1];
  y[W + 1] = y[W];
}

UNO_TARGET_CLONES void band(const uint8_t* img, int64_t H, int64_t W, int64_t gw, int64_t r0, int64_t r1,
          const std::vector<int64_t>& col_edges, TargetKind kind, float* out_row) {
  const int64_t Wp = W + 2;
  const int64_t rb0 = std::max<int64_t>(r0 - 1, 0);
  const int64_t rb1 = std::min<int64_t>(r1 + 1, H);  // exclusive
  std::vector<float> ybuf(static_cast<size_t>((rb1 - rb0) * Wp));
  for (int64_t r = rb0; r < rb1; ++r) luma_row(img + r * W * 3, W, ybuf.data() + (r - rb0) * Wp);
  std::vector<float> v(static_cast<size_t>(W));
  std::vector<double> acc(static_cast<size_t>(gw), 0.0);
  float* vp = v.data();
  for (int64_t r = r0; r < r1; ++r) {
    const float* yu = ybuf.data() + (std::max<int64_t>(r - 1, 0) - rb0) * Wp;
    const float* yc = ybuf.data() + (r - rb0) * Wp;
    const float* yd = ybuf.data() + (std::min<int64_t>(r + 1, H - 1) - rb0) * Wp;
    if (kind == TargetKind::kDensity) {
#pragma omp simd
      for (int64_t c = 1; c <= W; ++c) {
        const float gx = yc[c + 1] - yc[c];
        const float gy = yd[c] - yc[c];
        vp[c - 1] = gx * gx + gy * gy;
      }
    } else {
#pragma omp simd
      for (int64_t c = 1; c <= W; ++c) {
        const float gx = ((yu[c + 1] - yu[c - 1]) + 2.0f * (yc[c + 1] - yc[c - 1]) + (yd[c + 1] - yd[c - 1])) *
                         0.125f;
        const float gy = ((yd[c - 1] - yu[c - 1]) + 2.0f * (yd[c] - yu[c]) + (yd[c + 1] - yu[c + 1])) * 0.125f;
        vp[c - 1] = std::sqrt(gx * gx + gy * gy);
      }
    }
    for (int64_t b = 0; b < gw; ++b) {
      float s = 0.0f;
      const int64_t c0 = col_edges[b], c1 = col_edges[b + 1];
#pragma omp simd reduction(+ : s)
      for (int64_t c = c0; c < c1; ++c) s += vp[c];
      acc[b] += s;
    }
  }
  const double rows = static_cast<double>(r1 - r0);
  for (int64_t b = 0; b < gw; ++b) {
    out_row[b] = static_cast<float>(acc[b] / (rows * static_cast<double>(col_edges[b + 1] - col_edges[b])));
  }
}

}  // namespace

void patch_targets(const uint8_t* images, int64_t n_images, int64_t H, int64_t W, int64_t gh, int64_t gw,
                   TargetKind kind, int num_threads, float* out) {
  std::vector<int64_t> col_edges(static_cast<size_t>(gw + 1));
  for (int64_t b = 0; b <= gw; ++b) col_edges[b] = b * W / gw;
  const int64_t n_tasks = n_images * gh;
#ifdef _OPENMP
  const int nt = num_threads > 0 ? num_threads : omp_get_max_threads();
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
#endif
  for (int64_t task = 0; task < n_tasks; ++task) {
    const int64_t i = task / gh, a = task % gh;
    const int64_t r0 = a * H / gh, r1 = (a + 1) * H / gh;
    band(images + i * H * W * 3, H, W, gw, r0, r1, col_edges, kind, out + i * gh * gw + a * gw);
  }
  (void)num_threads;
}

}  // namespace uno
