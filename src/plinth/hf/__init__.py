"""Hugging Face interop: import checkpoints (model directories, GGUF files) into plinth's own model
classes and export them back in the Hugging Face layout.

    plinth import ref-minilm models/minilm
    plinth export models/minilm hf/minilm --format hf

families.py holds one small mapping per family (config translation, parameter names both ways;
plinth.peft.save uses them for adapters in peft's format); convert.py reads, converts and writes;
fingerprints.py is the one fingerprint of a model's weights (import.json and adapters record it);
commands.py is the CLI.
"""

from plinth.hf.convert import (
    REFERENCES,
    export_model,
    fingerprint,
    import_model,
    reference_path,
)

__all__ = ["REFERENCES", "export_model", "fingerprint", "import_model", "reference_path"]
