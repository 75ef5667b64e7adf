// C ABI shared by the CUTLASS kernel instances, the INT4 unpack kernel and the Python side (ctypes).
// No torch headers: the .cu files compile with nvcc and the CUTLASS headers alone.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

// Output element of the epilogue: kRaw = the int32 accumulator itself (exactness tests).
enum FqOutDtype : int { kRaw = 0, kF32 = 1, kBF16 = 2, kF16 = 3 };

struct FqGemmParams {
  const int8_t* a;       // [m, k] row-major, row stride lda (elements), 16-byte aligned
  const int8_t* b;       // [n, k] row-major (= k x n column-major), row stride ldb
  void* d;               // [m, n] row-major, row stride ldd, element given by out_dtype
  const float* bias;     // [n] float32 or nullptr
  int64_t lda, ldb, ldd;
  int m, n, k;
  const float* scale;    // [n] float32 (activation scale x each output channel's weight scale;
                         //      with row_scale: the weight side alone)
  int out_dtype;         // FqOutDtype
  int sm_count;          // 0: query the device
  void* workspace;       // device memory of at least fq_instance_workspace() bytes (may be null if 0)
  cudaStream_t stream;
  const float* row_scale;  // [m] float32 per-row (per-token) scale, or nullptr (every row 1.0)
};

// Every kernel instance is its own shared library (one tile config x output dtype x epilogue, built
// on first use) exporting:
//   const char* fq_instance_name();                       "config:out_dtype:act"
//   long long   fq_instance_workspace(const FqGemmParams*);
//   int         fq_instance_run(const FqGemmParams*, char* err, int err_len);   0 = ok
// The API library (fq_cutlass_api.cu) holds the INT4 -> INT8 unpack kernel.
