// Framework-free CPU per-sample Fisher (the arguments and what they compute: fq/fisher_args.h).
#pragma once

#include "fq/fisher_args.h"

namespace fq::cpu {

void per_sample_fisher(const FisherArgs& a);

}  // namespace fq::cpu
