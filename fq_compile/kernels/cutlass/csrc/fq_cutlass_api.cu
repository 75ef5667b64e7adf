// The INT4 -> INT8 unpack kernel the CUTLASS INT4 path runs before the INT8 GEMM, as a C entry point
// the Python side calls through ctypes (cutlass/gemm.py).  The GEMM instances are separate libraries.
#include <cstdio>
#include <cstring>

#include "fq_cutlass.h"

namespace {

// Packed signed INT4 (two per byte, low nibble = even element) -> int8.  One thread handles 4 packed
// bytes of a row when rows are 4-byte aligned (one 32-bit load, two 32-bit stores), else 1 byte.
__device__ __forceinline__ uint32_t sext_nibbles(uint32_t v) {  // v: 4 nibbles in the low bits of bytes
  return v | ((v & 0x08080808u) * 30u);                          // 0x08 * 30 = 0xF0: set the high bits
}

__global__ void unpack_int4_vec4(const uint8_t* __restrict__ src, int64_t lds, int8_t* __restrict__ dst,
                                 int64_t rows, int64_t kb) {  // kb: packed bytes per row, multiple of 4
  int64_t words = kb / 4;
  int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= rows * words) return;
  int64_t r = i / words, w = i - r * words;
  uint32_t x = *reinterpret_cast<const uint32_t*>(src + r * lds + w * 4);
  uint32_t lo = sext_nibbles(x & 0x0F0F0F0Fu);
  uint32_t hi = sext_nibbles((x >> 4) & 0x0F0F0F0Fu);
  uint2 out;
  out.x = __byte_perm(lo, hi, 0x5140);  // lo.b0 hi.b0 lo.b1 hi.b1
  out.y = __byte_perm(lo, hi, 0x7362);  // lo.b2 hi.b2 lo.b3 hi.b3
  *reinterpret_cast<uint2*>(dst + r * kb * 2 + w * 8) = out;
}

__global__ void unpack_int4_scalar(const uint8_t* __restrict__ src, int64_t lds, int8_t* __restrict__ dst,
                                   int64_t rows, int64_t kb) {
  int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= rows * kb) return;
  int64_t r = i / kb, j = i - r * kb;
  int8_t b = static_cast<int8_t>(src[r * lds + j]);
  dst[r * kb * 2 + 2 * j] = static_cast<int8_t>(static_cast<int8_t>(b << 4) >> 4);
  dst[r * kb * 2 + 2 * j + 1] = static_cast<int8_t>(b >> 4);
}

void set_err(char* err, int len, const char* msg) {
  if (err && len > 0) snprintf(err, len, "%s", msg);
}

}  // namespace

extern "C" {

// dst [rows, 2*kb] int8 contiguous  <-  src [rows, kb] packed bytes with row stride lds.
int fq_unpack_int4(const uint8_t* src, int64_t lds, int8_t* dst, int64_t rows, int64_t kb, cudaStream_t stream,
                   char* err, int err_len) {
  if (rows <= 0 || kb <= 0) return 0;
  const int threads = 256;
  bool vec = (kb % 4 == 0) && (lds % 4 == 0) && (reinterpret_cast<uintptr_t>(src) % 4 == 0) &&
             (reinterpret_cast<uintptr_t>(dst) % 8 == 0);
  int64_t work = vec ? rows * (kb / 4) : rows * kb;
  int64_t blocks = (work + threads - 1) / threads;
  if (blocks > 0x7fffffffLL) {
    set_err(err, err_len, "unpack_int4: tensor too large");
    return 1;
  }
  if (vec)
    unpack_int4_vec4<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(src, lds, dst, rows, kb);
  else
    unpack_int4_scalar<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(src, lds, dst, rows, kb);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    set_err(err, err_len, cudaGetErrorString(e));
    return 2;
  }
  return 0;
}

}  // extern "C"
