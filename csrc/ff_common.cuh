// Shared device/host helpers for the fisherforget kernels. Torch-free: plain CUDA runtime types.
//
// Every per-element routine is __host__ __device__ so that the same code also runs on the CPU
// (ExecTarget::emulate_on_host), which lets the kernels be tested on machines without a GPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "ff_kernels.h"

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

// ------------------------------------------------------------------ rounding-exact fp32 arithmetic
// The reference backend evaluates the update as a chain of separate torch ops, each rounded to fp32.
// Where a contracted fused multiply-add would change which elements freeze (the Fisher value) or
// would drift from that chain for no gain, these keep each step individually rounded.
FF_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
FF_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
FF_HD float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
FF_HD float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
FF_HD double dmul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
FF_HD double dsub_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}

// torch.lerp's formula (ATen Lerp.h): the branch keeps the result exact at both ends.
FF_HD float lerp(float start, float end, float weight) {
  return fabsf(weight) < 0.5f ? start + weight * (end - start)
                              : end - (end - start) * (1.0f - weight);
}

// torch.maximum propagates NaN (fmaxf would drop it).
FF_HD float max_propagate_nan(float a, float b) {
  if (a != a) return a;
  if (b != b) return b;
  return a > b ? a : b;
}

// ----------------------------------------------------------------------------- vector memory ops
// Loads and stores move 16 bytes per instruction: kVec (= 8) elements are two 16-byte packets for
// fp32 and one for bf16/fp16. Aggregates of T alias T legally, so the same code is valid host C++.
constexpr int kVec = 8;

template <typename T>
struct alignas(16) Packet16 {
  static constexpr int kCount = 16 / static_cast<int>(sizeof(T));
  T v[kCount];
};

template <typename T>
struct Vec8 {
  T v[kVec];
};

template <typename T>
FF_HD Vec8<T> load_vec(const T* p) {
  using Packet = Packet16<T>;
  Vec8<T> out;
#pragma unroll
  for (int j = 0; j < kVec / Packet::kCount; ++j) {
    const Packet packet = reinterpret_cast<const Packet*>(p)[j];
#pragma unroll
    for (int k = 0; k < Packet::kCount; ++k) out.v[j * Packet::kCount + k] = packet.v[k];
  }
  return out;
}

template <typename T>
FF_HD void store_vec(T* p, const Vec8<T>& value) {
  using Packet = Packet16<T>;
#pragma unroll
  for (int j = 0; j < kVec / Packet::kCount; ++j) {
    Packet packet;
#pragma unroll
    for (int k = 0; k < Packet::kCount; ++k) packet.v[k] = value.v[j * Packet::kCount + k];
    reinterpret_cast<Packet*>(p)[j] = packet;
  }
}

// Eight bool mask bytes in one 8-byte load.
struct alignas(8) MaskVec8 {
  bool v[kVec];
};
FF_HD MaskVec8 load_mask_vec(const bool* p) { return *reinterpret_cast<const MaskVec8*>(p); }

FF_HD bool aligned_to(const void* p, uintptr_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}

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
