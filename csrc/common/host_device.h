// TM_HOST_DEVICE: scalar helpers that the CPU references and the CUDA kernels share (so that both
// compute the same function) are compiled for both sides under nvcc and as plain inline
// functions elsewhere.
#pragma once

#if defined(__CUDACC__)
#define TM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TM_HOST_DEVICE inline
#endif
