// FQ_MULTIVERSION: compile a hot CPU loop for AVX-512, AVX2 and baseline x86-64, with the
// variant chosen at load time (the module is built without -march=native, so it runs on
// any x86-64 machine). Other compilers and architectures get the one baseline version.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FQ_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FQ_MULTIVERSION
#endif
