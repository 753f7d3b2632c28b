/* LD_PRELOAD shim: makes this process see an AVX2-only x86-64 CPU, so that ONNX Runtime's MLAS,
 * DeepSparse, MNN and edgesparse's kernel library all pick their AVX2 code on an AVX-512 machine.
 *
 * How: Linux's CPUID faulting (arch_prctl ARCH_SET_CPUID, CPU flag "cpuid_fault") makes every
 * CPUID instruction of this thread, and of the threads it creates later, raise SIGSEGV. The
 * handler runs the real CPUID with faulting briefly off, clears the AVX-512 feature bits, and
 * steps over the instruction. Libraries choose their kernels from CPUID (XGETBV still reports the
 * AVX-512 register state, but nothing uses it without the CPUID bits). /proc/cpuinfo is not
 * changed: set EDGESPARSE_ISA=avx2 too (run.sh does). A program that installs its own SIGSEGV
 * handler (DeepSparse does, for crash reports) gets it chained behind this one: sigaction() and
 * signal() for SIGSEGV are intercepted, and real faults go to the program's handler.
 *
 * What it is not: an AVX2 chip. Caches, memory and clocks stay those of this CPU. */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <dlfcn.h>
#include <signal.h>
#include <string.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

static void set_faulting(int on) { syscall(SYS_arch_prctl, ARCH_SET_CPUID, on ? 0 : 1); }

typedef int (*sigaction_fn)(int, const struct sigaction*, struct sigaction*);
static struct sigaction program_handler;  // the program's own SIGSEGV handler (SIG_DFL until it sets one)

static sigaction_fn real_sigaction(void) {
  static sigaction_fn real;
  if (!real) real = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
  return real;
}

int sigaction(int sig, const struct sigaction* act, struct sigaction* old) {
  if (sig != SIGSEGV) return real_sigaction()(sig, act, old);
  if (old) *old = program_handler;
  if (act) program_handler = *act;
  return 0;
}

sighandler_t signal(int sig, sighandler_t handler) {
  struct sigaction act, old;
  memset(&act, 0, sizeof act);
  act.sa_handler = handler;
  if (sigaction(sig, &act, &old) != 0) return SIG_ERR;
  return old.sa_handler;
}

static void not_cpuid(int sig, siginfo_t* info, void* context) {
  if (program_handler.sa_flags & SA_SIGINFO) {
    program_handler.sa_sigaction(sig, info, context);
  } else if (program_handler.sa_handler != SIG_DFL && program_handler.sa_handler != SIG_IGN) {
    program_handler.sa_handler(sig);
  } else {  // no handler of the program's: die of the fault as usual
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    real_sigaction()(SIGSEGV, &dfl, NULL);
  }
}

static void on_segv(int sig, siginfo_t* info, void* context) {
  ucontext_t* uc = (ucontext_t*)context;
  greg_t* r = uc->uc_mcontext.gregs;
  const unsigned char* ip = (const unsigned char*)r[REG_RIP];
  if (ip == NULL || ip[0] != 0x0f || ip[1] != 0xa2) {  // a real fault
    not_cpuid(sig, info, context);
    return;
  }
  unsigned leaf = (unsigned)r[REG_RAX], sub = (unsigned)r[REG_RCX], a, b, c, d;
  set_faulting(0);
  __cpuid_count(leaf, sub, a, b, c, d);
  set_faulting(1);
  if (leaf == 7 && sub == 0) {
    b &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) | (1u << 31));
    c &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14));
    d &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 23));
  } else if (leaf == 7 && sub == 1) {
    a &= ~(1u << 5);  // AVX512_BF16
  } else if (leaf == 0xd && sub == 0) {
    a &= ~0xe0u;  // XSAVE components 5-7 (opmask, ZMM) not offered
  }
  r[REG_RAX] = a, r[REG_RBX] = b, r[REG_RCX] = c, r[REG_RDX] = d;
  r[REG_RIP] += 2;
}

__attribute__((constructor)) static void mask_avx512(void) {
  struct sigaction sa = {0};
  sa.sa_sigaction = on_segv;
  sa.sa_flags = SA_SIGINFO | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  program_handler.sa_handler = SIG_DFL;
  if (real_sigaction()(SIGSEGV, &sa, NULL) != 0 || syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
    fprintf(stderr, "mask_avx512: CPUID faulting unavailable on this machine\n");
    _exit(3);
  }
}
