/* cpuid_cap: run a whole process as if its x86 CPU lacked AVX-512 (and VNNI, AMX), so that
 * onnxruntime's MLAS, OpenVINO, oneDNN, torch, numpy and the engine's own dispatch all pick
 * their AVX2 kernels on an AVX-512 machine. A first estimate of an AVX2-only CPU, nothing more:
 * the clocks, caches and port layout stay this CPU's.
 *
 * How: Linux's ARCH_SET_CPUID makes the `cpuid` instruction fault (needs the `cpuid_fault` flag
 * in /proc/cpuinfo); a SIGSEGV handler runs the real cpuid with faulting lifted for a moment,
 * clears the capped bits and steps over the instruction. The setting is inherited by threads and
 * fork()ed children, and LD_PRELOAD re-arms it after exec.
 *
 *   gcc -O2 -shared -fPIC -o /tmp/cpuid_cap.so benchmarks/cpuid_cap.c
 *   CPUID_CAP=avx2 LD_PRELOAD=/tmp/cpuid_cap.so python -m engine.bench ...
 *
 * CPUID_CAP: avx2 (no AVX-512, AVX-VNNI or AMX: a Zen 1-3 / Haswell-class CPU; the default) or
 * avx512 (AVX-512 without VNNI, bf16, fp16 or AMX: a Skylake-SP-class CPU). Any other value
 * fails at start. A process that later installs its own SIGSEGV handler (faulthandler, for one)
 * crashes at its next cpuid, so leave Python's faulthandler off.
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define ARCH_GET_CPUID 0x1011
#define ARCH_SET_CPUID 0x1012

/* Bits to clear, per register, for leaf 7 subleaf 0 and leaf 7 subleaf 1. */
static uint32_t clear7_ebx, clear7_ecx, clear7_edx, clear71_eax;

static void real_cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
  __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

static void on_sigsegv(int sig, siginfo_t *info, void *ctx_) {
  ucontext_t *ctx = (ucontext_t *)ctx_;
  greg_t *g = ctx->uc_mcontext.gregs;
  const unsigned char *ip = (const unsigned char *)g[REG_RIP];
  if (ip[0] != 0x0f || ip[1] != 0xa2) {   /* not a cpuid: a real fault */
    signal(sig, SIG_DFL);
    return;   /* re-executes the faulting instruction and dies with the default action */
  }
  uint32_t leaf = (uint32_t)g[REG_RAX], sub = (uint32_t)g[REG_RCX], r[4];
  syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
  real_cpuid(leaf, sub, r);
  syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
  if (leaf == 7 && sub == 0) {
    r[1] &= ~clear7_ebx;
    r[2] &= ~clear7_ecx;
    r[3] &= ~clear7_edx;
  } else if (leaf == 7 && sub == 1) {
    r[0] &= ~clear71_eax;
  }
  g[REG_RAX] = r[0];
  g[REG_RBX] = r[1];
  g[REG_RCX] = r[2];
  g[REG_RDX] = r[3];
  g[REG_RIP] += 2;
  (void)info;
}

__attribute__((constructor)) static void cpuid_cap_init(void) {
  const char *cap = getenv("CPUID_CAP");
  if (!cap || !*cap) cap = "avx2";
  /* leaf 7.0 EDX: avx512_4vnniw/4fmaps (2,3), vp2intersect (8), amx_bf16 (22), avx512_fp16 (23),
     amx_tile (24), amx_int8 (25); ECX: avx512_vnni (11); leaf 7.1 EAX: avx_vnni (4), avx512_bf16 (5),
     amx_fp16 (21). */
  const uint32_t avx512_ebx = (1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) |
                              (1u << 28) | (1u << 30) | (1u << 31);
  const uint32_t avx512_ecx = (1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14);
  const uint32_t newer_edx = (1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) |
                             (1u << 25);
  const uint32_t newer_71_eax = (1u << 4) | (1u << 5) | (1u << 21);
  if (strcmp(cap, "avx2") == 0) {
    clear7_ebx = avx512_ebx;
    clear7_ecx = avx512_ecx;
    clear7_edx = newer_edx;
    clear71_eax = newer_71_eax;
  } else if (strcmp(cap, "avx512") == 0) {   /* Skylake-SP: F, DQ, CD, BW, VL only */
    clear7_ebx = (1u << 21) | (1u << 26) | (1u << 27);
    clear7_ecx = avx512_ecx;
    clear7_edx = newer_edx;
    clear71_eax = newer_71_eax;
  } else {
    fprintf(stderr, "cpuid_cap: CPUID_CAP=%s is not one of avx2, avx512\n", cap);
    _exit(2);
  }
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_sigsegv;
  sa.sa_flags = SA_SIGINFO | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  if (sigaction(SIGSEGV, &sa, NULL) != 0 || syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
    fprintf(stderr, "cpuid_cap: this kernel or CPU cannot fault on cpuid (no cpuid_fault flag in "
                    "/proc/cpuinfo); run without LD_PRELOAD\n");
    _exit(2);
  }
}
