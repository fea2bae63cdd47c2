"""icm-lora's ML core: tasks, task vectors, LoRA layout, the CVAE and adapter generation. No HTTP, Redis or metrics."""
