"""The icm-lora HTTP service (see DESIGN.md); the engine lives in service.engine."""
