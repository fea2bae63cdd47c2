"""Register a task, then complete with its adapter. Run with ICM_LORA_BASE_URL (and ICM_LORA_API_KEY) set."""

from __future__ import annotations

import sys

from icm_lora_client import Client

with Client() as client:
    print("health:", client.health().status)
    task = client.create_task(
        "Decide whether the listed words are fruits or animals.",
        [{"input": "kiwi pear lime", "output": "yes"}, {"input": "wolf goat otter", "output": "no"}],
        task_id="fruit-or-animal",
    )
    print("task:", task.task_id, "adapter:", task.adapter_id)
    result = client.complete(task.task_id, "Input: mango plum kiwi\nOutput:", max_tokens=4, temperature=0)
    print("completion:", repr(result.text), "tokens:", result.usage.completion_tokens, "model:", result.model)
    print("models:", ", ".join(m.id for m in client.models().data))
    print("torch imported:", "torch" in sys.modules)
