// One ISA's kernel table. Compiled once per ISA variant (see es_simd.h); the
// macro ES_TABLE_NAME names the exported table (es_table_avx512, ...).
#include "bsmm_kernel.h"
#include "es_kernels.h"

#ifndef ES_TABLE_NAME
#error "compile with -DES_TABLE_NAME=es_table_<isa>"
#endif

extern "C" const es_kernel_table ES_TABLE_NAME = {
    ES_ISA_NAME,
    ES_VEC_FLOATS,
    ES_NS::bsmm_tile_m,
    ES_NS::bsmm_pack,
    ES_NS::bsmm_range,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
};
