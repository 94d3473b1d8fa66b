// Launches marker_a(out, 5) on 4 blocks through the runtime (<<<>>>) and through
// the driver API (cuLaunchKernel), then prints what each block wrote as JSON.
#include <cstdio>
#include <cuda.h>
#include <cuda_runtime.h>

extern "C" __global__ void marker_a(int *out, int v) { out[blockIdx.x] = v; }
extern "C" __global__ void marker_b(int *out, int v) { out[blockIdx.x] = v + 1000; }

static void show(const char *path, int *d) {
    int h[4];
    cudaMemcpy(h, d, sizeof h, cudaMemcpyDeviceToHost);
    printf("\"%s\": [%d, %d, %d, %d]", path, h[0], h[1], h[2], h[3]);
    cudaMemset(d, 0, sizeof h);
}

int main() {
    int *d;
    cudaMalloc(&d, 4 * sizeof(int));
    cudaMemset(d, 0, 4 * sizeof(int));
    printf("{");
    marker_a<<<4, 1>>>(d, 5);
    cudaDeviceSynchronize();
    show("runtime", d);
    CUfunction f;
    cudaGetFuncBySymbol(&f, (const void *)marker_a);
    int v = 5;
    void *args[] = {&d, &v};
    // the driver's cuLaunchKernel through the runtime: no link against libcuda needed
    typedef CUresult (*launch_fn)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                                  CUstream, void **, void **);
    void *entry = nullptr;
    cudaDriverEntryPointQueryResult found;
    cudaGetDriverEntryPointByVersion("cuLaunchKernel", &entry, 12000, cudaEnableDefault, &found);
    CUresult r = entry ? ((launch_fn)entry)(f, 4, 1, 1, 1, 1, 1, 0, 0, args, nullptr) : CUDA_ERROR_NOT_FOUND;
    cudaDeviceSynchronize();
    printf(", \"driver_rc\": %d, ", (int)r);
    show("driver", d);
    printf("}\n");
    return 0;
}
