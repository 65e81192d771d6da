"""Tests only: lets accelerate 1.15 run FSDP on a CPU, so the sharded path of the generated script
is executed here, not first on a paid GPU. Imported by Python at start-up when this folder is on
PYTHONPATH; does nothing unless FINETUNE_TEST_CPU_FSDP=1.

accelerate promotes a run to FSDP only for multi-device types of accelerators
(`AcceleratorState.__init__`, accelerate/state.py: MULTI_GPU, MULTI_XPU, MULTI_NPU, ...); a CPU run
is MULTI_CPU, so the FSDP plugin the config asks for is dropped without a word and the run trains
data parallel. torch 2.13's `fully_shard` itself shards on a CPU over gloo. This re-applies, for
MULTI_CPU, what that branch does for the other types. The product refuses `strategy: fsdp` on a CPU
for exactly this reason; nothing outside the tests uses this file."""

import os

if os.environ.get("FINETUNE_TEST_CPU_FSDP") == "1":
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    _init = AcceleratorState.__init__

    def _with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
        _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            print(f"cpu-fsdp shim: FSDP{fsdp_plugin.fsdp_version} on the CPU over gloo", flush=True)

    AcceleratorState.__init__ = _with_fsdp_on_cpu
