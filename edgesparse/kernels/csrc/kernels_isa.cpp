// One ISA's kernel table. Compiled once per ISA variant (see es_simd.h); the
// macro ES_TABLE_NAME names the exported table (es_table_avx512, ...).
#include "bsconv_kernel.h"
#include "bsmm_kernel.h"
#include "dwconv_kernel.h"
#include "gffn_kernel.h"
#include "nchw16c_kernel.h"
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
    ES_NS::bsconv_tile,
    ES_NS::bsconv_prepared_floats,
    ES_NS::bsconv_prepare,
    ES_NS::bsconv_positions,
    ES_NS::bsconv_range,
    ES_NS::gffn_tile_m,
    ES_NS::gffn_scratch,
    ES_NS::gffn_pack,
    ES_NS::gffn_up,
    ES_NS::gffn_down,
    ES_NS::gffn_range,
    ES_NS::bsmm_tile,
    ES_NS::dwconv_scratch,
    ES_NS::dwconv_range,
    ES_NS::bsconv16_range,
    ES_NS::dwconv16_range,
};
