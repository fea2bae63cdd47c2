"""The icm-lora command line."""
