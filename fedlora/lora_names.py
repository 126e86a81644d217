"""Which tensors of a PEFT adapter are LoRA factors, by name (importable without torch)."""


def is_lora_a(name: str) -> bool:
    return ".lora_A." in name


def is_lora_b(name: str) -> bool:
    return ".lora_B." in name


def is_lora_factor(name: str) -> bool:
    """A LoRA factor, or sb's r x r matrix between them (`.lora_R.`, server coordinates only); else a fully trained tensor."""
    return is_lora_a(name) or is_lora_b(name) or ".lora_R." in name
