"""edge_annotator.bench: throughput benchmarks, side by side in one run (`make bench`).

Outside the three stages because it compares the runtime with transformers: the runtime itself
stays torch-free, and `annotate-cli bench` reaches it by name through runtime/commands.py's
table.
"""
