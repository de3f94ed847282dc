"""edge_annotator.export: a merged model to one self-describing GGUF file, and parity checks.

Needs the `export` extra: pip install 'edge-annotator[export]'.
"""
