"""Hugging Face interop: import checkpoints (model directories, GGUF files) into plinth's own model
classes and export them back in the Hugging Face layout.

    plinth import ref-minilm models/minilm
    plinth export models/minilm hf/minilm --format hf

families.py holds one small mapping per family (config translation, parameter names both ways;
plinth.peft uses them for adapters in peft's format); importer.py reads and converts a Hugging
Face directory or GGUF file into a plinth model directory, whose files layout.py names;
exporter.py writes a loaded plinth model back; fingerprints.py is the one fingerprint of a
model's weights (import.json and adapters record it). The commands live in plinth.recipes.convert,
which loads the model to export (plinth.load) above this package.
"""

from plinth.hf.exporter import export_hf
from plinth.hf.fingerprints import fingerprint
from plinth.hf.importer import REFERENCES, import_model, reference_path

__all__ = ["REFERENCES", "export_hf", "fingerprint", "import_model", "reference_path"]
