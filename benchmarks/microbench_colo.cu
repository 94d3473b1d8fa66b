// Copied from the team reference (../shared/reference/microbench_colo.cu): the microbenchmark pair of DESIGN.md fact 5.
// Reference microbenchmark of DESIGN.md fact 5: an HP client (bursts of 20 short kernels every 5-10 ms,
// latency per burst) and a BE client (back-to-back ~1 ms kernels, kernels/s). Modes: hp | be | both (two threads).
// Env: HP_HIGH=1 (HP stream at highest priority), HP_KERNELS, HP_BLOCKS, HP_ITERS, BE_BLOCKS, BE_ITERS.
// Build: nvcc -O2 -arch=sm_90 -o colo microbench_colo.cu -lpthread
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
#include <chrono>
#include <thread>
#include <atomic>
#include <cuda_runtime.h>
#define CK(x) do{cudaError_t e=(x); if(e!=cudaSuccess){fprintf(stderr,"%s:%d %s\n",__FILE__,__LINE__,cudaGetErrorString(e));exit(1);}}while(0)
__global__ void work(float* out, int iters){
  float a = threadIdx.x*0.001f, b = blockIdx.x*0.0001f;
  for(int i=0;i<iters;i++){ a = a*1.0000001f + b; b = b*0.9999999f + a*1e-7f; }
  if(a==12345.f) out[blockIdx.x]=a+b;
}
static double now(){ return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
int envi(const char*n,int d){const char*v=getenv(n);return v?atoi(v):d;}
void run_be(double dur, int prio, const char* tag){
  cudaStream_t s; CK(cudaStreamCreateWithPriority(&s,cudaStreamNonBlocking,prio));
  float* out; CK(cudaMalloc(&out, 1<<20));
  int blocks=envi("BE_BLOCKS",132*16), iters=envi("BE_ITERS",20000);
  work<<<blocks,256,0,s>>>(out,iters); CK(cudaStreamSynchronize(s));
  double t0=now(); long n=0;
  while(now()-t0<dur){ for(int k=0;k<4;k++) work<<<blocks,256,0,s>>>(out,iters); n+=4; CK(cudaStreamSynchronize(s)); }
  double t=now()-t0; printf("[%s BE] kernels/s=%.1f (kernel ~%.3f ms alone-equiv)\n",tag,n/t,1000*t/n);
}
void run_hp(double dur, int prio, const char* tag){
  cudaStream_t s; CK(cudaStreamCreateWithPriority(&s,cudaStreamNonBlocking,prio));
  float* out; CK(cudaMalloc(&out, 1<<20));
  int nk=envi("HP_KERNELS",20), blocks=envi("HP_BLOCKS",264), iters=envi("HP_ITERS",2000);
  for(int i=0;i<5;i++){ for(int k=0;k<nk;k++) work<<<blocks,128,0,s>>>(out,iters); CK(cudaStreamSynchronize(s)); }
  std::vector<double> lat; double t0=now(); srand(1);
  while(now()-t0<dur){
    double t=now(); for(int k=0;k<nk;k++) work<<<blocks,128,0,s>>>(out,iters); CK(cudaStreamSynchronize(s)); lat.push_back((now()-t)*1000);
    std::this_thread::sleep_for(std::chrono::microseconds(5000 + rand()%5000));
  }
  std::sort(lat.begin(),lat.end()); auto p=[&](double q){return lat[std::min(lat.size()-1,(size_t)(q*lat.size()))];};
  printf("[%s HP] n=%zu p50=%.3f p99=%.3f max=%.3f ms\n",tag,lat.size(),p(0.5),p(0.99),lat.back());
}
int main(int argc,char**argv){
  const char* mode=argv[1]; double dur=atof(argv[2]); const char*tag=argc>3?argv[3]:"";
  int lo,hi; CK(cudaDeviceGetStreamPriorityRange(&lo,&hi));
  int hp_prio = envi("HP_HIGH",0)? hi : lo;
  int be_prio = lo;
  if(!strcmp(mode,"be")) run_be(dur,be_prio,tag);
  else if(!strcmp(mode,"hp")) run_hp(dur,hp_prio,tag);
  else { // both in one process, two threads
    std::thread a([&]{run_be(dur+1,be_prio,tag);}); std::this_thread::sleep_for(std::chrono::milliseconds(300));
    run_hp(dur,hp_prio,tag); a.join(); }
  return 0;
}
