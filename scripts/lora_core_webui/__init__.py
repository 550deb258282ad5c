"""WebUI glue for lora_core: everything here may import the WebUI; nothing in lora_core does."""
