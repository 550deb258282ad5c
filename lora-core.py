"""Run the tools from any directory: ``python path/to/sd-webui-lora-core/lora-core.py COMMAND ...``.

The same as ``python -m lora_core COMMAND ...``, which finds the package only from this folder (or with it on
PYTHONPATH); Python puts the folder of the script it runs on ``sys.path``, so this file finds it from anywhere.
Use the WebUI's Python (its venv has torch and safetensors).
"""
import sys

from lora_core.cli import main

if __name__ == "__main__":
    sys.exit(main(prog=f"python {sys.argv[0]}"))
