"""edge_annotator.train: fine-tuning (LoRA, QLoRA as a flag on it) and merging.

Uses the runtime's spec and prompt rendering, so that training text equals run-time text.
Needs the `train` extra: pip install 'edge-annotator[train]'.
"""
