"""edge_annotator.runtime: everything needed to annotate with a .gguf annotator, and nothing of torch.

Every stage shares this package: the task spec (spec.py), prompt rendering (prompt.py), input
formats (data.py) and agreement metrics (metrics.py). train/ and export/ import from here; this
package never imports from them, nor torch or transformers (tests/test_packaging.py checks it).
"""

__version__ = "0.1.0"
