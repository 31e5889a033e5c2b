"""Compile the training step or the sampler for a TPU slice or NVIDIA GPU nodes from any machine, and report
what the compiler says of it per device (`python -m pbe_jax.aot --help`; docs/tpu.md, docs/benchmarks.md).

- `targets`: the chips and GPUs, their topology names, memory and peak rates, and the compile-only devices;
- `hlo`: what the compiled program's HLO text says (FLOPs with loops and library calls, kernels, collectives);
- `report`: the report of a compiled program, and the two programs (training step, sampler);
- `cli`: the command line.
"""
from pbe_jax.aot.cli import check_train, main
from pbe_jax.aot.hlo import collectives, custom_calls, dtype_census, mosaic_kernels, program_flops
from pbe_jax.aot.report import analyse, compile_report, emit, flop_count, sample_report, table, train_report
from pbe_jax.aot.targets import (CHIPS, GPUS, GiB, Topology, TopologyError, check_slices, have_compiler,
                                 parse_topology, prepare_host, topology)

__all__ = ["CHIPS", "GPUS", "GiB", "Topology", "TopologyError", "analyse", "check_slices", "check_train",
           "collectives", "compile_report", "custom_calls", "dtype_census", "emit", "flop_count", "have_compiler",
           "main", "mosaic_kernels", "parse_topology", "prepare_host", "program_flops", "sample_report", "table",
           "topology", "train_report"]
