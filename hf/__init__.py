"""The torch side that training and export share: HF models scored exactly as annotate-cli scores
a GGUF (token trees, the answers' tries, the runtime's probabilities and scores) and the check
that an HF tokenizer splits text as the GGUF's vocabulary does.

    tree.py      token-tree micro-batches and their attention (training's forward pass too)
    score.py     score_items / validate / report_of: an HF model's labels, probabilities, alphas
    tokcheck.py  HF tokenizer against llama.cpp's vocabulary; the fingerprint from_gguf writes

export/ (parity, the importance matrix) depends on this package and on the runtime, never on train/.
"""
