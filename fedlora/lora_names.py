"""Which tensors of a PEFT adapter are LoRA factors, by name (importable without torch)."""


def is_lora_a(name: str) -> bool:
    return ".lora_A." in name


def is_lora_b(name: str) -> bool:
    return ".lora_B." in name
