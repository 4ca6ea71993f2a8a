"""LoRA for training: the PEFT wrap and adapter saving the trainer uses (they live in ``core.lora``, beside the
adapter loading that inference needs)."""
from fuselip_med.core.lora import (
    adapter_parameter_count,
    apply_lora,
    is_adapter_dir,
    load_adapter,
    load_for_inference,
    merge_adapter,
    save_adapter,
    target_pattern,
)

__all__ = ["adapter_parameter_count", "apply_lora", "is_adapter_dir", "load_adapter", "load_for_inference",
           "merge_adapter", "save_adapter", "target_pattern"]
