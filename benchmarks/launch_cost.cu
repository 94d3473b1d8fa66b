// Host cost of one kernel launch: back-to-back launches of an empty kernel in
// batches small enough that the launch queue never fills (so the GPU never
// throttles the host), timing only the launch calls. Prints ns per launch.
// Run it with and without `tally run --` to get the agent's cost per launch.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cuda_runtime.h>

__global__ void empty_kernel() {}

int main() {
    const int batch = 256, batches = 800;
    cudaStream_t s;
    if (cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) != cudaSuccess) return 1;
    for (int i = 0; i < 2000; i++) empty_kernel<<<1, 32, 0, s>>>();  // warm-up
    cudaStreamSynchronize(s);
    double launch_s = 0;
    for (int b = 0; b < batches; b++) {
        auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < batch; i++) empty_kernel<<<1, 32, 0, s>>>();
        auto t1 = std::chrono::steady_clock::now();
        launch_s += std::chrono::duration<double>(t1 - t0).count();
        cudaStreamSynchronize(s);
    }
    if (cudaGetLastError() != cudaSuccess) { fprintf(stderr, "launch failed\n"); return 1; }
    printf("%.1f\n", launch_s * 1e9 / (double(batch) * batches));
    return 0;
}
