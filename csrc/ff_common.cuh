// Shared device/host helpers for the fisherforget kernels. Torch-free: plain CUDA runtime types.
//
// Every per-element routine is __host__ __device__ so that the same code also runs on the CPU
// (ExecTarget::emulate_on_host), which lets the kernels be tested on machines without a GPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "ff_kernels.h"
#include "ff_math.h"
#include "ff_tensor_table.h"

// The tables are kernel arguments of up to 32,764 bytes (CUDA 12.1+, compute capability 7.0+);
// older toolkits get 4,096-byte tables (more launches, same results).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700 && CUDART_VERSION >= 12010
#error "fisherforget's kernels need compute capability 7.0 or newer (32 KB kernel arguments)"
#endif

#define FF_HD __host__ __device__ __forceinline__

namespace fisherforget {

// ----------------------------------------------------------------------------------- conversions
// torch compiles with __CUDA_NO_BFLOAT16_CONVERSIONS__/__CUDA_NO_HALF_CONVERSIONS__: convert with
// the explicit intrinsics only (they exist on the host too).
FF_HD float to_float(float x) { return x; }
FF_HD float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
FF_HD float to_float(__half x) { return __half2float(x); }

template <typename T>
FF_HD T from_float(float x);
template <>
FF_HD float from_float<float>(float x) { return x; }
template <>
FF_HD __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
FF_HD __half from_float<__half>(float x) { return __float2half_rn(x); }

// A Fisher value as stored: fp32 as is, bf16 stochastically rounded with the random bits of
// element `index` of its tensor (ff_math.h; the CPU kernels and the reference compute the same).
FF_HD float fisher_from_float(float x, uint32_t, int64_t, const float*) { return x; }
FF_HD __nv_bfloat16 fisher_from_float(float x, uint32_t key, int64_t index,
                                      const __nv_bfloat16*) {
  __nv_bfloat16_raw raw;
  raw.x = math::bf16_bits_stochastic(x, key, index);
  return __nv_bfloat16(raw);
}

// ------------------------------------------------------------------ rounding-exact arithmetic
// The reference backend evaluates the update as a chain of separate torch ops, each rounded. nvcc
// contracts a * b + c into one fused multiply-add (one rounding) wherever it can, and the host
// compiler of the emulation does not: every fp32 multiply and add of the kernels goes through
// math::add/sub/mul/div/sqrt of ff_math.h (shared with the CPU kernels), which are IEEE
// round-to-nearest on both sides (the _rn intrinsics are never contracted), so a kernel computes
// the same bits on the GPU as in the host emulation, and a Fisher value next to a freeze
// threshold falls on the same side of it (float64 too: the constants, the Fisher score).

// ----------------------------------------------------------------------------- vector memory ops
// A block walks its chunk in tiles of kTile = kVec * kBlockSize elements; each thread handles kVec
// (= 8) elements of a tile. The threads interleave at packets of kPacket elements (16 bytes of
// the widest operand: 4 when any operand is fp32, 8 when all are 16-bit): packet j of thread t
// is packet j * kBlockSize + t of the tile, so each load or store instruction of a warp covers
// 32 consecutive packets (512 contiguous bytes for fp32: whole 32-byte sectors). An operand
// narrower than the widest moves kPacket * its size bytes per access (8 for bf16 beside fp32).
// Element k of thread t is tile element tile_element<kPacket>(t, k). Aggregates of T alias T
// legally, so the same code is valid host C++ (the emulation).
constexpr int kVec = 8;
constexpr int64_t kTile = static_cast<int64_t>(kVec) * kBlockSize;

template <typename T>
struct Vec8 {
  T v[kVec];
};

template <typename T, int kPacket>
struct alignas(sizeof(T) * kPacket) Packet {
  T v[kPacket];
};

template <int kPacket>
FF_HD int64_t tile_element(int thread, int k) {
  return (static_cast<int64_t>(k / kPacket) * kBlockSize + thread) * kPacket + k % kPacket;
}

template <int kPacket, typename T>
FF_HD Vec8<T> load_tile(const T* tile, int thread) {
  static_assert(kVec % kPacket == 0, "a thread's elements are whole packets");
  using P = Packet<T, kPacket>;
  Vec8<T> out;
#pragma unroll
  for (int j = 0; j < kVec / kPacket; ++j) {
    const P packet = reinterpret_cast<const P*>(tile)[j * kBlockSize + thread];
#pragma unroll
    for (int k = 0; k < kPacket; ++k) out.v[j * kPacket + k] = packet.v[k];
  }
  return out;
}

template <int kPacket, typename T>
FF_HD void store_tile(T* tile, int thread, const Vec8<T>& value) {
  using P = Packet<T, kPacket>;
#pragma unroll
  for (int j = 0; j < kVec / kPacket; ++j) {
    P packet;
#pragma unroll
    for (int k = 0; k < kPacket; ++k) packet.v[k] = value.v[j * kPacket + k];
    reinterpret_cast<P*>(tile)[j * kBlockSize + thread] = packet;
  }
}

// Packet width for operands of these element sizes: 16 bytes of the widest.
constexpr int packet_elems(int widest_bytes) { return 16 / widest_bytes; }

FF_HD bool aligned_to(const void* p, uintptr_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}

// Blocks of `kernel` (kBlockSize threads) that the current device holds at once, cached per device
// in `cache` (64 entries, zero-initialised). The host emulation uses kEmulatedResidentBlocks, few
// enough that its blocks stride over chunks as on a GPU.
constexpr int kEmulatedResidentBlocks = 3;
constexpr int kMaxCachedDevices = 64;

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fisherforget: ") + what + " failed: " +
                             cudaGetErrorString(err));
  }
}

template <typename Kernel>
int resident_blocks(Kernel kernel, std::atomic<int>* cache) {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  const bool cached = device >= 0 && device < kMaxCachedDevices;
  if (cached) {
    const int known = cache[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int per_sm = 0, sms = 0;
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kBlockSize, 0),
             "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
             "cudaDeviceGetAttribute(multiProcessorCount)");
  const int blocks = (per_sm > 0 ? per_sm : 1) * (sms > 0 ? sms : 1);
  if (cached) cache[device].store(blocks, std::memory_order_relaxed);
  return blocks;
}

// Kernel-parameter bytes of this build's tables.
#if CUDART_VERSION >= 12010
constexpr int kParamBytes = kLargeParamBytes;
#else
constexpr int kParamBytes = kSmallParamBytes;
#endif

// Rejects (std::invalid_argument) a tensor too large for a table's 40-bit element count.
void check_table_numels(const char* op, int64_t num_tensors, const int64_t* numels);

// ----------------------------------------------------------------------------- launch checking
inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fisherforget CUDA kernel launch failed (") + what +
                             "): " + cudaGetErrorString(err));
  }
}

inline cudaStream_t as_stream(const ExecTarget& target) {
  return static_cast<cudaStream_t>(target.stream);
}

}  // namespace fisherforget
