// Memory for the large CPU outputs of the ops (see output_buffers.h).
#include "output_buffers.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace gfmrag_fast {
namespace {

constexpr size_t kMinCachedBytes = size_t(4) << 20;
constexpr size_t kMaxCachedBytes = size_t(256) << 20;
constexpr size_t kHugePage = size_t(2) << 20;

class OutputAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    if (bytes == 0) return {nullptr, c10::Device(c10::kCPU)};
    void* data = take(bytes);
    return {data, new Block{data, bytes}, &release, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, size_t count) const override { std::memcpy(dest, src, count); }

 private:
  struct Block {
    void* data;
    size_t bytes;
  };

  void* take(size_t bytes) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      const auto it = free_.find(bytes);
      if (it != free_.end()) {
        void* data = it->second;
        free_.erase(it);
        cached_bytes_ -= bytes;
        return data;
      }
    }
    void* data = nullptr;
    TORCH_CHECK(posix_memalign(&data, kHugePage, bytes) == 0 && data != nullptr,
                "gfmrag_fast: out of memory allocating ", bytes, " bytes");
#ifdef __linux__
    const size_t whole_pages = bytes / kHugePage * kHugePage;
    if (whole_pages > 0) madvise(data, whole_pages, MADV_HUGEPAGE);  // advice only: errors ignored
#endif
    return data;
  }

  static void release(void* context) {
    const Block* block = static_cast<Block*>(context);
    instance().give(block->data, block->bytes);
    delete block;
  }

  void give(void* data, size_t bytes) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (bytes >= kMinCachedBytes && cached_bytes_ + bytes <= kMaxCachedBytes) {
        free_.emplace(bytes, data);
        cached_bytes_ += bytes;
        return;
      }
    }
    std::free(data);
  }

 public:
  static OutputAllocator& instance() {
    static OutputAllocator* allocator = new OutputAllocator();  // never destroyed: tensors may outlive statics
    return *allocator;
  }

 private:
  std::mutex mutex_;
  std::multimap<size_t, void*> free_;
  size_t cached_bytes_ = 0;
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (!options.device().is_cpu() || bytes < kMinCachedBytes) return at::empty(sizes, options);
  return at::detail::empty_generic(sizes, &OutputAllocator::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), std::nullopt);
}

}  // namespace gfmrag_fast
