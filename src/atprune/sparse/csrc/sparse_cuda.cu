// atprune sparse decode kernels for NVIDIA GPUs (sm_80 and later; tuned on an H200).
//
// GPU layout ("tiles", built by atprune/sparse/cuda.py from the same checkpoint as the CPU layout):
//   A weight W [rows, cols] is cut per row into tiles of 1024 columns (the last one padded with zero bits).
//   Within a tile, lane l of a warp owns the 32 columns {32 j + l : j = 0..31} (interleaved, so that when every
//   lane reads x at its own columns the 32 shared-memory accesses fall in 32 different banks).
//   bitmap   uint32 [rows * tiles * 32]: word (r, t, l) bit j = 1 iff W[r, 1024 t + 32 j + l] is stored.
//   values   16-bit [chunks * 8]: per (r, t) in row-major order, the stored entries lane by lane (lane 0's in j
//            order, then lane 1's, ...), padded with zeros to a multiple of 8 entries (16 bytes), so that every
//            tile starts on a 16-byte boundary and is copied with coalesced 128-bit loads.
//   tile_off int32 [rows * tiles + 1]: the first 16-byte chunk of each tile; the last entry is the chunk count.
//
// Decode kernel (y [M, rows] = x [M, cols] W^T, M <= 16): one warp per (row, split of the row's tiles). A block's
// eight warps share x (float32, [tile columns][B]) in shared memory. Each warp streams its tiles through a double
// buffer in shared memory with cp.async (the next tile's values are in flight while the current one is computed),
// finds each lane's first value by a warp prefix sum of the bitmap popcounts, and walks the set bits. Partial sums
// of a row are reduced across the warp with shuffles; when a row is split over several blocks (long rows, or large
// batches whose x does not fit), the splits add into a float32 workspace and a second kernel writes y.
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>

#include <cstdint>

namespace {

constexpr int kTile = 1024;        // columns per tile
constexpr int kWarps = 16;         // warps per block (one row each; they share the block's x)
constexpr int kStageChunks = kTile / 8;  // 16-byte chunks of a dense tile (worst case)
constexpr unsigned kFull = 0xffffffffu;

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }

// Issue the cp.async copies of tile `tile` into `stage` (16-byte chunks, lane-strided: coalesced) and return the
// lane's bitmap word (a plain load, in flight with the copies).
__device__ __forceinline__ uint32_t issue_tile(const uint32_t* __restrict__ bitmap, const uint4* __restrict__ values,
                                               const int* __restrict__ tile_off, int64_t tile, uint4* stage,
                                               int lane) {
  const int off = __ldg(tile_off + tile);
  const int n = __ldg(tile_off + tile + 1) - off;
  for (int c = lane; c < n; c += 32) __pipeline_memcpy_async(stage + c, values + off + c, 16);
  __pipeline_commit();
  return __ldg(bitmap + tile * 32 + lane);
}

// x[:, c0 : c0 + span] as float32 into xs [span][B] (rows >= M and columns >= cols as zeros). With 16-byte aligned
// rows (x 16-byte aligned and cols % 8 == 0, every real model) each thread loads 8 values per 128-bit load, all
// loads independent; otherwise one value per load.
template <typename T, int B>
__device__ __forceinline__ void stage_x(const T* __restrict__ x, int M, int cols, int c0, int span, float* xs) {
  if ((cols & 7) == 0 && (reinterpret_cast<uintptr_t>(x) & 15) == 0) {
    const int chunks = span / 8;
#pragma unroll 4
    for (int c = threadIdx.x; c < chunks * B; c += blockDim.x) {
      const int b = c % B, i = (c / B) * 8, col = c0 + i;  // b fastest: the smem stores of a warp do not collide
      uint4 raw = make_uint4(0, 0, 0, 0);
      if (b < M && col < cols) raw = __ldg(reinterpret_cast<const uint4*>(x + (int64_t)b * cols + col));
      const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int k = 0; k < 8; ++k) xs[(i + k) * B + b] = to_f(v[k]);
    }
  } else {
    for (int i = threadIdx.x; i < span; i += blockDim.x) {
      const int col = c0 + i;
#pragma unroll
      for (int b = 0; b < B; ++b) xs[i * B + b] = (b < M && col < cols) ? to_f(x[(int64_t)b * cols + col]) : 0.f;
    }
  }
}

template <typename T, int B>
__global__ void __launch_bounds__(kWarps * 32) decode_kernel(
    const T* __restrict__ x, int M, int cols, const uint32_t* __restrict__ bitmap, const uint4* __restrict__ values,
    const int* __restrict__ tile_off, int rows, int tiles, int tiles_per_split, T* __restrict__ y,
    float* __restrict__ workspace, const T* __restrict__ bias) {
  extern __shared__ __align__(16) unsigned char smem[];
  uint4* stage_all = reinterpret_cast<uint4*>(smem);                   // [kWarps][2][kStageChunks]
  float* xs = reinterpret_cast<float*>(smem + sizeof(uint4) * kWarps * 2 * kStageChunks);  // [span * 1024][B]

  const int t0 = blockIdx.y * tiles_per_split;
  const int t1 = min(tiles, t0 + tiles_per_split);
  const int span = (t1 - t0) * kTile;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row = blockIdx.x * kWarps + warp;
  uint4* stage = stage_all + warp * 2 * kStageChunks;

  // Start this warp's first tile before x is staged: its latency overlaps the x load.
  uint32_t word_next = 0;
  if (row < rows) word_next = issue_tile(bitmap, values, tile_off, (int64_t)row * tiles + t0, stage, lane);

  stage_x<T, B>(x, M, cols, t0 * kTile, span, xs);
  __syncthreads();
  if (row >= rows) return;

  float acc[B];
#pragma unroll
  for (int b = 0; b < B; ++b) acc[b] = 0.f;

  for (int t = t0; t < t1; ++t) {
    const int buf = (t - t0) & 1;
    uint32_t word = word_next;
    if (t + 1 < t1) {
      word_next = issue_tile(bitmap, values, tile_off, (int64_t)row * tiles + t + 1,
                             stage + (buf ^ 1) * kStageChunks, lane);
    } else {
      __pipeline_commit();  // an empty group keeps the wait count uniform
    }
    // Exclusive prefix sum of the lanes' popcounts: where this lane's values start in the tile.
    const int count = __popc(word);
    int pre = count;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int v = __shfl_up_sync(kFull, pre, d);
      if (lane >= d) pre += v;
    }
    pre -= count;
    __pipeline_wait_prior(1);
    __syncwarp();
    const T* sv = reinterpret_cast<const T*>(stage + buf * kStageChunks);
    const float* xt = xs + (int64_t)(t - t0) * kTile * B + lane * B;
#pragma unroll 2
    while (word) {
      const int j = __ffs(word) - 1;
      word &= word - 1;
      const float w = to_f(sv[pre++]);
      const float* xp = xt + j * 32 * B;
      if constexpr (B % 4 == 0) {
#pragma unroll
        for (int b = 0; b < B; b += 4) {
          const float4 v = *reinterpret_cast<const float4*>(xp + b);
          acc[b] += w * v.x; acc[b + 1] += w * v.y; acc[b + 2] += w * v.z; acc[b + 3] += w * v.w;
        }
      } else {
#pragma unroll
        for (int b = 0; b < B; ++b) acc[b] += w * xp[b];
      }
    }
    __syncwarp();  // every lane is done with this buffer before the next iteration's copies refill it
  }

#pragma unroll
  for (int b = 0; b < B; ++b) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc[b] += __shfl_xor_sync(kFull, acc[b], o);
  }
  if (lane == 0) {
#pragma unroll
    for (int b = 0; b < B; ++b) {
      if (b >= M) break;
      if (workspace != nullptr) {
        atomicAdd(workspace + (int64_t)b * rows + row, acc[b]);
      } else {
        const float bv = bias != nullptr ? to_f(bias[row]) : 0.f;
        y[(int64_t)b * rows + row] = from_f<T>(acc[b] + bv);
      }
    }
  }
}

template <typename T>
__global__ void finish_kernel(const float* __restrict__ workspace, const T* __restrict__ bias, T* __restrict__ y,
                              int M, int rows) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (int64_t)M * rows) return;
  const float bv = bias != nullptr ? to_f(bias[i % rows]) : 0.f;
  y[i] = from_f<T>(workspace[i] + bv);
}

// Dense [rows, tiles * 1024] from the tiles (one warp per (row, tile); coalesced 2-byte stores). For prefill.
template <typename T>
__global__ void unpack_kernel(const uint32_t* __restrict__ bitmap, const T* __restrict__ values,
                              const int* __restrict__ tile_off, int rows, int tiles, int cols, T* __restrict__ out) {
  const int64_t task = (int64_t)blockIdx.x * kWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (task >= (int64_t)rows * tiles) return;
  const int64_t r = task / tiles;
  const int t = (int)(task % tiles);
  const uint32_t word = bitmap[task * 32 + lane];
  const int count = __popc(word);
  int pre = count;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int v = __shfl_up_sync(kFull, pre, d);
    if (lane >= d) pre += v;
  }
  pre -= count;
  const T* v = values + (int64_t)tile_off[task] * 8 + pre;
  const T zero = from_f<T>(0.f);
  int k = 0;
  for (int j = 0; j < 32; ++j) {
    const int col = t * kTile + 32 * j + lane;
    const bool set = (word >> j) & 1u;
    const T val = set ? v[k] : zero;
    k += set;
    if (col < cols) out[r * cols + col] = val;
  }
}

int batch_template(int M) { return M <= 1 ? 1 : M <= 2 ? 2 : M <= 4 ? 4 : M <= 8 ? 8 : 16; }

// Shared memory available to one block (bytes): the opt-in maximum of the current device.
int max_smem() {
  int device = 0, value = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  return value;
}

template <typename T, int B>
void launch(const torch::Tensor& x2, int M, int cols, const torch::Tensor& bitmap, const torch::Tensor& values,
            const torch::Tensor& tile_off, int rows, int tiles, int tiles_per_split, torch::Tensor& y,
            const c10::optional<torch::Tensor>& bias, cudaStream_t stream) {
  const int splits = (tiles + tiles_per_split - 1) / tiles_per_split;
  const size_t smem = sizeof(uint4) * kWarps * 2 * kStageChunks + sizeof(float) * (size_t)tiles_per_split * kTile * B;
  auto kernel = decode_kernel<T, B>;
  TORCH_CHECK((int64_t)smem <= max_smem(), "sparse_mm: ", M, " tokens need ", smem, " bytes of shared memory per "
              "block, this GPU allows ", max_smem(), " (use fewer tokens per call)");
  if (smem > 48 * 1024) {  // the limit is per device: set it on every call (cheap), not once per process
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  }
  const T* bias_ptr = bias.has_value() ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr;
  torch::Tensor ws;
  float* ws_ptr = nullptr;
  if (splits > 1) {
    ws = torch::zeros({M, rows}, x2.options().dtype(torch::kFloat32));
    ws_ptr = ws.data_ptr<float>();
  }
  dim3 grid((rows + kWarps - 1) / kWarps, splits);
  kernel<<<grid, kWarps * 32, smem, stream>>>(
      reinterpret_cast<const T*>(x2.data_ptr()), M, cols, reinterpret_cast<const uint32_t*>(bitmap.data_ptr()),
      reinterpret_cast<const uint4*>(values.data_ptr()), tile_off.data_ptr<int>(), rows, tiles, tiles_per_split,
      reinterpret_cast<T*>(y.data_ptr()), ws_ptr, bias_ptr);
  if (splits > 1) {
    const int64_t n = (int64_t)M * rows;
    finish_kernel<T><<<(unsigned)((n + 255) / 256), 256, 0, stream>>>(ws_ptr, bias_ptr,
                                                                      reinterpret_cast<T*>(y.data_ptr()), M, rows);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void dispatch_batch(int Bt, const torch::Tensor& x2, int M, int cols, const torch::Tensor& bitmap,
                    const torch::Tensor& values, const torch::Tensor& tile_off, int rows, int tiles,
                    int tiles_per_split, torch::Tensor& y, const c10::optional<torch::Tensor>& bias,
                    cudaStream_t stream) {
  switch (Bt) {
    case 1: launch<T, 1>(x2, M, cols, bitmap, values, tile_off, rows, tiles, tiles_per_split, y, bias, stream); break;
    case 2: launch<T, 2>(x2, M, cols, bitmap, values, tile_off, rows, tiles, tiles_per_split, y, bias, stream); break;
    case 4: launch<T, 4>(x2, M, cols, bitmap, values, tile_off, rows, tiles, tiles_per_split, y, bias, stream); break;
    case 8: launch<T, 8>(x2, M, cols, bitmap, values, tile_off, rows, tiles, tiles_per_split, y, bias, stream); break;
    default: launch<T, 16>(x2, M, cols, bitmap, values, tile_off, rows, tiles, tiles_per_split, y, bias, stream);
  }
}

}  // namespace

// y [..., rows] = x [..., cols] W^T (+ bias); x contiguous, bf16 or fp16 like the values, at most 16 rows of x.
// tiles_per_split: 0 = choose (x of a block's tiles kept within x_smem_bytes of shared memory).
torch::Tensor sparse_mm(torch::Tensor x, torch::Tensor bitmap, torch::Tensor values, torch::Tensor tile_off,
                        int64_t rows, c10::optional<torch::Tensor> bias, int64_t tiles_per_split,
                        int64_t x_smem_bytes) {
  TORCH_CHECK(x.is_cuda() && values.is_cuda() && bitmap.is_cuda() && tile_off.is_cuda(), "sparse_mm: CUDA tensors");
  TORCH_CHECK(x.scalar_type() == values.scalar_type(), "sparse_mm: x and values must have one dtype");
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kHalf, "sparse_mm: bf16 or fp16");
  TORCH_CHECK(tile_off.scalar_type() == torch::kInt32 && bitmap.scalar_type() == torch::kInt32, "sparse_mm: int32");
  TORCH_CHECK(values.device() == x.device() && bitmap.device() == x.device() && tile_off.device() == x.device(),
              "sparse_mm: x and the weight must be on one GPU");
  if (bias.has_value()) {
    TORCH_CHECK(bias->device() == x.device() && bias->scalar_type() == x.scalar_type() && bias->numel() == rows &&
                bias->is_contiguous(), "sparse_mm: bias must be a contiguous [rows] tensor of x's dtype and device");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const int cols = (int)x.size(-1);
  const int64_t M64 = x.numel() / std::max<int64_t>(cols, 1);
  TORCH_CHECK(M64 >= 1 && M64 <= 16, "sparse_mm: 1 to 16 rows of x, got ", M64);
  const int M = (int)M64;
  const int tiles = (cols + kTile - 1) / kTile;
  TORCH_CHECK(bitmap.numel() == rows * tiles * 32 && tile_off.numel() == rows * tiles + 1, "sparse_mm: layout");
  auto x2 = x.contiguous().view({M, cols});
  const int Bt = batch_template(M);
  if (tiles_per_split <= 0) {
    const int64_t budget = std::min<int64_t>(x_smem_bytes, max_smem() - (int64_t)sizeof(uint4) * kWarps * 2 * kStageChunks);
    tiles_per_split = std::max<int64_t>(1, budget / ((int64_t)kTile * Bt * (int64_t)sizeof(float)));
  }
  tiles_per_split = std::min<int64_t>(tiles_per_split, tiles);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = rows;
  auto y = torch::empty(shape, x.options());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (x.scalar_type() == torch::kBFloat16) {
    dispatch_batch<__nv_bfloat16>(Bt, x2, M, cols, bitmap, values, tile_off, (int)rows, tiles, (int)tiles_per_split,
                                  y, bias, stream);
  } else {
    dispatch_batch<__half>(Bt, x2, M, cols, bitmap, values, tile_off, (int)rows, tiles, (int)tiles_per_split, y,
                           bias, stream);
  }
  return y;
}

// Dense [rows, cols] weight from the tiles, in the values' dtype.
torch::Tensor unpack(torch::Tensor bitmap, torch::Tensor values, torch::Tensor tile_off, int64_t rows, int64_t cols) {
  TORCH_CHECK(values.is_cuda(), "unpack: CUDA tensors");
  const c10::cuda::CUDAGuard guard(values.device());
  const int tiles = (int)((cols + kTile - 1) / kTile);
  auto out = torch::empty({rows, cols}, values.options());
  const int64_t tasks = rows * tiles;
  if (tasks == 0) return out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const unsigned blocks = (unsigned)((tasks + kWarps - 1) / kWarps);
  if (values.scalar_type() == torch::kBFloat16) {
    unpack_kernel<__nv_bfloat16><<<blocks, kWarps * 32, 0, stream>>>(
        reinterpret_cast<const uint32_t*>(bitmap.data_ptr()), reinterpret_cast<const __nv_bfloat16*>(values.data_ptr()),
        tile_off.data_ptr<int>(), (int)rows, tiles, (int)cols, reinterpret_cast<__nv_bfloat16*>(out.data_ptr()));
  } else {
    TORCH_CHECK(values.scalar_type() == torch::kHalf, "unpack: bf16 or fp16");
    unpack_kernel<__half><<<blocks, kWarps * 32, 0, stream>>>(
        reinterpret_cast<const uint32_t*>(bitmap.data_ptr()), reinterpret_cast<const __half*>(values.data_ptr()),
        tile_off.data_ptr<int>(), (int)rows, tiles, (int)cols, reinterpret_cast<__half*>(out.data_ptr()));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_mm", &sparse_mm, "tiled-bitmap sparse x W^T for 1-16 rows of x (bf16/fp16)");
  m.def("unpack", &unpack, "dense weight from the tiled-bitmap layout");
}
