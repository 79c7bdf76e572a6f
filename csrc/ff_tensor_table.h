// Chunked multi-tensor launch planning (pure C++; no CUDA, no torch).
//
// As ATen's MultiTensorApply: every tensor is cut into chunks of `chunk_size` elements, one thread
// block per chunk. A launch's kernel argument holds a table of at most kMaxTensors tensor slots and
// kMaxBlocks (slot, chunk) pairs; when either fills up the launch is emitted, and a tensor whose
// chunks are not all scheduled yet moves to slot 0 of the next launch. Empty tensors get no block.
#pragma once

#include <cstdint>

namespace fisherforget {

constexpr int64_t kChunkSize = 65536;  // elements per thread block
constexpr int kBlockSize = 512;        // threads per block (a power of two: tree reductions)

inline int64_t num_chunks(int64_t numel, int64_t chunk_size) {
  return (numel + chunk_size - 1) / chunk_size;
}

template <int kMaxTensors, int kMaxBlocks>
struct LaunchPlan {
  static_assert(kMaxTensors >= 1 && kMaxTensors <= 256, "slot indices are stored as uint8_t");
  int num_slots = 0;
  int num_blocks = 0;
  int64_t slot_tensor[kMaxTensors];  // index into the caller's tensor lists
  uint8_t block_slot[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
};

// Calls on_launch(plan) for each launch, in order; together the launches cover every chunk of
// every non-empty tensor exactly once, in tensor order then chunk order.
template <int kMaxTensors, int kMaxBlocks, typename OnLaunch>
void plan_launches(int64_t num_tensors, const int64_t* numels, int64_t chunk_size,
                   OnLaunch&& on_launch) {
  LaunchPlan<kMaxTensors, kMaxBlocks> plan;
  for (int64_t tensor = 0; tensor < num_tensors; ++tensor) {
    const int64_t numel = numels[tensor];
    if (numel <= 0) continue;
    plan.slot_tensor[plan.num_slots++] = tensor;
    const int64_t chunks = num_chunks(numel, chunk_size);
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      plan.block_slot[plan.num_blocks] = static_cast<uint8_t>(plan.num_slots - 1);
      plan.block_chunk[plan.num_blocks] = static_cast<int32_t>(chunk);
      ++plan.num_blocks;
      const bool last_chunk = chunk == chunks - 1;
      // A slot is only free again once all of its tensor's chunks are scheduled.
      const bool tensors_full = plan.num_slots == kMaxTensors && last_chunk;
      const bool blocks_full = plan.num_blocks == kMaxBlocks;
      if (tensors_full || blocks_full) {
        on_launch(static_cast<const LaunchPlan<kMaxTensors, kMaxBlocks>&>(plan));
        plan.num_blocks = 0;
        if (last_chunk) {
          plan.num_slots = 0;
        } else {
          plan.slot_tensor[0] = tensor;
          plan.num_slots = 1;
        }
      }
    }
  }
  if (plan.num_blocks > 0) on_launch(static_cast<const LaunchPlan<kMaxTensors, kMaxBlocks>&>(plan));
}

}  // namespace fisherforget
