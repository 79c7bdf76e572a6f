// Checks csrc/ff_tensor_table.h's launch planning on the host (compiled and run by
// tests/backends/test_cuda.py with a plain C++ compiler): over random tensor sizes and small table
// capacities, the launches cover every chunk of every non-empty tensor exactly once and in order,
// never exceed the table capacities, and only the last launch is not full.
#include <cstdio>
#include <random>
#include <utility>
#include <vector>

#include "ff_tensor_table.h"

using fisherforget::LaunchPlan;
using fisherforget::num_chunks;
using fisherforget::plan_launches;

static int failures = 0;

#define EXPECT(cond, ...)                                   \
  do {                                                      \
    if (!(cond)) {                                          \
      if (failures < 20) std::printf("FAIL: " __VA_ARGS__); \
      ++failures;                                           \
    }                                                       \
  } while (0)

template <int kMaxTensors, int kMaxBlocks>
void check(std::mt19937_64& rng, int trials, int64_t max_chunks_per_tensor) {
  for (int trial = 0; trial < trials; ++trial) {
    const int64_t chunk_size = 1 + static_cast<int64_t>(rng() % 5);
    const int num_tensors = static_cast<int>(rng() % 40);
    std::vector<int64_t> numels(num_tensors);
    std::vector<std::pair<int64_t, int64_t>> expected;
    for (int t = 0; t < num_tensors; ++t) {
      numels[t] = (rng() % 4 == 0) ? 0 : static_cast<int64_t>(rng() % (chunk_size * max_chunks_per_tensor)) + 1;
      for (int64_t c = 0; c < num_chunks(numels[t], chunk_size); ++c) expected.emplace_back(t, c);
    }
    std::vector<std::pair<int64_t, int64_t>> got;
    int launches = 0;
    bool previous_was_full = true;
    plan_launches<kMaxTensors, kMaxBlocks>(
        num_tensors, numels.data(), chunk_size,
        [&](const LaunchPlan<kMaxTensors, kMaxBlocks>& plan) {
          EXPECT(previous_was_full, "launch %d follows a launch that was not full\n", launches);
          EXPECT(plan.num_slots >= 1 && plan.num_slots <= kMaxTensors, "num_slots %d\n",
                 plan.num_slots);
          EXPECT(plan.num_blocks >= 1 && plan.num_blocks <= kMaxBlocks, "num_blocks %d\n",
                 plan.num_blocks);
          std::vector<bool> slot_used(plan.num_slots, false);
          for (int b = 0; b < plan.num_blocks; ++b) {
            const int slot = plan.block_slot[b];
            EXPECT(slot < plan.num_slots, "block %d uses slot %d of %d\n", b, slot,
                   plan.num_slots);
            if (slot >= plan.num_slots) continue;
            slot_used[slot] = true;
            const int64_t tensor = plan.slot_tensor[slot];
            const int64_t chunk = plan.block_chunk[b];
            EXPECT(chunk * chunk_size < numels[tensor], "chunk %lld past tensor %lld\n",
                   static_cast<long long>(chunk), static_cast<long long>(tensor));
            got.emplace_back(tensor, chunk);
          }
          for (int s = 0; s < plan.num_slots; ++s) {
            EXPECT(slot_used[s], "slot %d has no block\n", s);
          }
          previous_was_full = plan.num_blocks == kMaxBlocks || plan.num_slots == kMaxTensors;
          ++launches;
        });
    EXPECT(got == expected, "trial %d (T=%d, B=%d): %zu blocks planned, %zu expected\n", trial,
           kMaxTensors, kMaxBlocks, got.size(), expected.size());
  }
}

int main() {
  std::mt19937_64 rng(20250917);
  check<1, 1>(rng, 300, 4);
  check<1, 3>(rng, 300, 8);
  check<2, 1>(rng, 300, 4);
  check<3, 4>(rng, 500, 8);
  check<5, 2>(rng, 300, 6);
  check<24, 320>(rng, 100, 400);
  check<96, 320>(rng, 100, 50);
  if (failures == 0) {
    std::printf("plan check ok\n");
    return 0;
  }
  std::printf("%d failures\n", failures);
  return 1;
}
