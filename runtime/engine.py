"""A thin, deterministic wrapper over llama.cpp's low-level API (llama-cpp-python's ctypes bindings).

It keeps a job's shared prefix (instruction and rubric) in sequence 0 of the KV cache, and
decodes token trees on top of it: the rows of several sequences in one llama_decode, with logits
only where scoring reads them (runtime/annotator.py builds the trees)::

    eng = LlamaEngine("model.gguf", n_threads=2)
    eng.set_prefix(eng.tokenize(instruction))
    eng.copy_prefix(1, n_instruction)
    got = eng.decode_rows(tokens, positions, [(1,)] * len(tokens), {len(tokens) - 1: answer_ids})

Greedy scoring needs no sampler, so nothing here is random: the same rows, decoded on the same
schedule, give bitwise the same logits whatever the thread count and whatever was evaluated
before (checked in tests/test_runtime.py).

Scoring reads a few answer tokens' logits, so the engine stops llama.cpp's graph before its output
layer and computes those logits itself (runtime/head.py; a quarter of the time per item on Gemma 3).
It checks that path against llama.cpp's own logits when it loads a model, and keeps llama.cpp's
output layer if they disagree (`head_check` says what it measured).
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from . import cpu
from .adapter_file import resolve_base
from .errors import ModelError
from .gguf_file import GGUFFormatError
from .head import OutputHead
from .llama_lib import ggml_lib as _ggml_lib
from .llama_lib import lib as _lib

log = logging.getLogger(__name__)


class ContextOverflow(ValueError):
    def __init__(self, n_tokens: int, n_ctx: int):
        self.n_tokens, self.n_ctx = n_tokens, n_ctx
        super().__init__(f"needs {n_tokens} tokens but the context window is {n_ctx}; "
                         f"shorten the text or raise --ctx")

    def __reduce__(self) -> tuple[type, tuple[int, int]]:  # crosses process boundaries (--workers)
        return (ContextOverflow, (self.n_tokens, self.n_ctx))


class _Capture:
    """What the eval callback collects in one micro-batch: llama.cpp's final hidden states
    ("result_norm", the output layer's input) of the output rows, and the residual stream after
    layers the decode taps ("l_out-N", every token of the micro-batch: N below the last layer,
    whose l_out holds the output rows only)."""

    NODE = b"result_norm"  # the name every llama.cpp model graph gives the output layer's input

    def __init__(self) -> None:
        self.on = False
        self.rows: list[np.ndarray] = []
        self.layers: dict[bytes, int] = {}
        self.taps: dict[int, np.ndarray] = {}
        self.bad: str | None = None

    def callback(self) -> Any:
        L, G = _lib(), _ggml_lib()

        @L.ggml_backend_sched_eval_callback
        def cb(t: int, ask: bool, _user: int) -> bool:
            name = G.ggml_get_name(t)
            if ask:  # asked for every node: is this one we want to read?
                return (self.on and name == self.NODE) or name in self.layers
            n = G.ggml_nelements(t)
            if G.ggml_nbytes(t) != 4 * n:
                self.bad = f"{name.decode()} is not float32"
                return True  # let llama.cpp finish; decode_rows reports it
            buf = np.empty(n, dtype=np.float32)
            G.ggml_backend_tensor_get(t, buf.ctypes.data, 0, 4 * n)
            if name != self.NODE:
                self.taps[self.layers[name]] = buf
                return True  # a layer's output: the graph goes on
            self.rows.append(buf)
            return False  # stop the graph here: what is left is the output layer

        return cb


GPU_ALL = -1
"""n_gpu_layers for every layer, the output layer included (llama.cpp: a negative value means all)."""


def backend_info() -> dict[str, Any]:
    """What this llama-cpp-python build runs on: GPU offload or not, llama.cpp's own feature line, and
    the CPU features its kernels use (AMX among them: runtime/cpu.py)."""
    L = _lib()
    return {"gpu_offload": bool(L.llama_supports_gpu_offload()), "llama_cpp_python": _version(),
            "system": cpu.system_info(), "cpu": cpu.describe_build()}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama_cpp_python")
    except PackageNotFoundError:
        return "unknown"


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


class LlamaModel:
    """A loaded GGUF model: weights, vocabulary and metadata, without a context."""

    def __init__(self, path: str | Path, *, n_gpu_layers: int = 0, vocab_only: bool = False,
                 extra_buffers: bool | None = None, base: str | Path | None = None):
        """extra_buffers: llama.cpp's extra buffer types (repacked and AMX weights); None: on unless
        this build uses AMX and a probe decode crashed on this CPU (runtime/cpu.py). base: the base
        GGUF of an adapter file, where it is not beside it (the CLI's --base-model)."""
        L = _lib()
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"{self.path}: model file not found")
        with open(self.path, "rb") as fh:
            magic = fh.read(4)
        if magic != b"GGUF":
            raise ModelError(f"{self.path}: not a GGUF file (it starts with {magic!r}, a GGUF with b'GGUF'); "
                             f"convert the model with 'annotate-cli export' or llama.cpp's converter")
        if n_gpu_layers != 0 and not vocab_only and not L.llama_supports_gpu_offload():
            raise ModelError(f"--gpu-layers {'all' if n_gpu_layers < 0 else n_gpu_layers}: this llama-cpp-python "
                             f"build runs on the CPU only (llama.cpp would ignore the flag); install a GPU build "
                             f"(make install-cuda; docs/install.md) or leave --gpu-layers at 0")
        # an annotator may be a LoRA adapter file over an untouched base GGUF (runtime/adapter_file.py):
        # the weights (and the output rows the answer head reads) are the base's
        self.weights_path = resolve_base(self.path, base) if not vocab_only else self.path
        self.adapter: Any = None
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers  # set always: llama.cpp's own default has changed between versions
        mp.vocab_only = vocab_only  # the tokenizer alone: no weights read (checks of HF tokenizers)
        if not vocab_only:
            mp.use_extra_bufts = extra_buffers if extra_buffers is not None else \
                cpu.extra_buffers_safe(self.weights_path)
        self.extra_buffers = bool(mp.use_extra_bufts)
        self.ptr = L.llama_model_load_from_file(str(self.weights_path).encode(), mp)
        if not self.ptr:
            raise ModelError(f"{self.weights_path}: llama.cpp could not load this model: the file is corrupt or "
                             f"truncated, or its architecture is not supported (run with -vv for llama.cpp's reason); "
                             f"copy or export it again")
        if self.weights_path != self.path:
            self.adapter = L.llama_adapter_lora_init(self.ptr, str(self.path).encode())
            if not self.adapter:
                L.llama_model_free(self.ptr)
                self.ptr = None
                raise ModelError(f"{self.path}: llama.cpp could not apply this LoRA adapter to {self.weights_path} "
                                 f"(run with -vv for its reason): export it again against that base")
        self.vocab = L.llama_model_get_vocab(self.ptr)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.add_bos = bool(L.llama_vocab_get_add_bos(self.vocab))
        self.n_ctx_train = L.llama_model_n_ctx_train(self.ptr)
        self.n_params = L.llama_model_n_params(self.ptr)

    def window(self, n_ctx: int) -> int:
        """The tokens one sequence may use when N_CTX is asked for: never more than the model was trained on."""
        return min(n_ctx, self.n_ctx_train) if self.n_ctx_train > 0 else n_ctx

    def tokenize(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of text; special-token text in the input stays plain text (no injection)."""
        L = _lib()
        data = text.encode("utf-8")
        bos = self.add_bos if add_bos is None else add_bos
        cap = len(data) + 8
        buf = (L.llama_token * cap)()
        n = L.llama_tokenize(self.vocab, data, len(data), buf, cap, bos, False)
        if n < 0:  # buffer too small: llama.cpp says how many it needs
            cap = -n
            buf = (L.llama_token * cap)()
            n = L.llama_tokenize(self.vocab, data, len(data), buf, cap, bos, False)
        return list(buf[:n])

    def meta(self, key: str) -> str | None:
        """A metadata value as text (llama.cpp renders numbers and booleans; arrays are summarised);
        for an adapter file, its own keys (the spec, provenance) first, then the base's."""
        L = _lib()
        if self.adapter is not None and key.startswith("edge_annotator."):
            return self._meta(lambda b, n: L.llama_adapter_meta_val_str(self.adapter, key.encode(), b, n))
        return self._meta(lambda b, n: L.llama_model_meta_val_str(self.ptr, key.encode(), b, n))

    @staticmethod
    def _meta(read: Any) -> str | None:
        size = 256
        while True:
            buf = ctypes.create_string_buffer(size)
            n = read(buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", errors="replace")
            size = n + 1  # the value was cut: llama.cpp returned its full length

    def close(self) -> None:
        if getattr(self, "adapter", None):
            _lib().llama_adapter_lora_free(self.adapter)
            self.adapter = None
        if getattr(self, "ptr", None):
            _lib().llama_model_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class LlamaEngine:
    """A llama.cpp context over a model: tokenization and scoring-oriented decoding.

    Sequence 0 holds the job's shared prefix; sequences 1.. are scratch space for the items of one
    decode (see decode_rows). The context is (re)made on demand by `reserve`.
    """

    def __init__(self, model: LlamaModel | str | Path, *, n_ctx: int = 2048, n_threads: int | None = None,
                 n_batch: int = 512, n_gpu_layers: int = 0, answer_head: bool = True,
                 extra_buffers: bool | None = None, base: str | Path | None = None):
        self._owns_model = not isinstance(model, LlamaModel)  # a model handed in is its owner's to free
        self.model = model if isinstance(model, LlamaModel) else \
            LlamaModel(model, n_gpu_layers=n_gpu_layers, extra_buffers=extra_buffers, base=base)
        self.path = self.model.path
        self._vocab = self.model.vocab
        self.n_vocab = self.model.n_vocab
        self.add_bos = self.model.add_bos
        self.n_ctx = self.model.window(n_ctx)
        self.n_threads = n_threads or default_threads()
        self.n_batch = n_batch
        self.n_evaluated = 0  # tokens decoded since load, for throughput accounting
        self._ctx: Any = None
        self._batch: Any = None
        self._mem: Any = None
        self.n_seq = 0
        self.n_cells = 0
        self.n_embd = _lib().llama_model_n_embd(self.model.ptr)
        self.n_layer = _lib().llama_model_n_layer(self.model.ptr)
        self._capture = _Capture()
        # one callback for every context this engine makes; None: llama.cpp's plain path
        self._cb: Any = self._capture.callback() if answer_head else None
        self.head: OutputHead | None = None
        self.head_check: dict[str, Any] = {"used": False, "reason": "answer_head=False"}
        self.reserve(1, self.n_ctx)
        if answer_head:
            self._check_head()

    def reserve(self, n_seq: int, n_cells: int) -> None:
        """Make sure the context has `n_seq` sequences and `n_cells` KV cells; a new context starts empty."""
        if self._ctx is not None and n_seq <= self.n_seq and n_cells <= self.n_cells:
            return
        L = _lib()
        self._free_context()
        cp = L.llama_context_default_params()
        cp.n_ctx = max(n_cells, self.n_cells)
        cp.n_batch = cp.n_ubatch = self.n_batch
        cp.n_seq_max = max(n_seq, self.n_seq, 1)
        # all sequences share one pool of cells, so copying the shared prefix to a sequence is free
        cp.kv_unified = True
        # Only the rows scoring reads get logits: at most one per sequence in a decode. llama.cpp
        # otherwise reserves a row per batch token: 512 x 262,144 vocab x 4 bytes = 512 MiB for Gemma 3.
        cp.n_outputs_max = cp.n_seq_max
        cp.n_threads = cp.n_threads_batch = self.n_threads
        cp.no_perf = True
        # Keep the whole sliding-window cache: without it llama.cpp prunes old positions of
        # sliding-window layers (Gemma 3) and a cached prefix could not be rolled back to.
        cp.swa_full = True
        # Flash attention off: llama.cpp's CPU flash-attention kernel splits work by thread count,
        # so its results changed with --threads (measured on 30 EmoBank items: labels identical,
        # probabilities not). Without it, 1, 2 and 3 threads agree bitwise, and scoring was faster
        # here (7.1 vs 6.1 items/s on 2 threads): prompts are short and KV reads are cheap.
        cp.flash_attn_type = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED
        # On a GPU build, where a layer runs is the model's --gpu-layers and nothing else: llama.cpp
        # otherwise sends the CPU layers' batches of 32 or more tokens to the GPU (op offload,
        # llama.cpp #6083 and #13386), so a layer's kernel would depend on a prompt's length. The KV
        # cache of an offloaded layer stays with it. Neither changes anything on a CPU-only build.
        cp.op_offload = False
        cp.offload_kqv = True
        # Reads the final hidden state of scoring's rows and skips the output layer (see head.py);
        # idle (one Python call per graph node, ~0.3 ms a decode) unless decode_rows turns it on.
        if self._cb is not None:
            cp.cb_eval = self._cb
        self._ctx = L.llama_init_from_model(self.model.ptr, cp)
        if not self._ctx:
            raise ModelError(f"{self.path}: llama.cpp could not create a context of {cp.n_ctx} tokens")
        self.n_seq, self.n_cells = cp.n_seq_max, L.llama_n_ctx(self._ctx)
        if self.model.adapter is not None:  # the annotator's LoRA, at the scale its alpha / r gives
            adapters = (L.llama_adapter_lora_p_ctypes * 1)(self.model.adapter)
            if L.llama_set_adapters_lora(self._ctx, adapters, 1, (ctypes.c_float * 1)(1.0)) != 0:
                raise ModelError(f"{self.path}: llama.cpp could not set the LoRA adapter on a context")
        self._mem = L.llama_get_memory(self._ctx)
        self._batch = L.llama_batch_init(self.n_batch, 0, self.n_seq)
        self._cached: list[int] = []  # tokens of sequence 0 in the cache, positions 0..len-1

    def _free_context(self) -> None:
        L = _lib()
        if getattr(self, "_batch", None) is not None:
            L.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            L.llama_free(self._ctx)
            self._ctx = None

    # -- tokens -------------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of text; special-token text in the input stays plain text (no injection)."""
        return self.model.tokenize(text, add_bos)

    def piece(self, token: int) -> str:
        L = _lib()
        buf = ctypes.create_string_buffer(64)
        n = L.llama_token_to_piece(self._vocab, token, buf, 64, 0, True)
        return buf.raw[: max(n, 0)].decode("utf-8", errors="replace")

    # -- evaluation ---------------------------------------------------------------------------
    def _decode(self, seg: list[int], pos: int, want_logits: bool) -> None:
        """Decode tokens into sequence 0 at positions pos.., in n_batch chunks; logits only for the last."""
        L = _lib()
        b = self._batch
        for start in range(0, len(seg), self.n_batch):
            chunk = seg[start:start + self.n_batch]
            last_chunk = start + self.n_batch >= len(seg)
            b.n_tokens = len(chunk)
            for i, t in enumerate(chunk):
                b.token[i] = t
                b.pos[i] = pos + start + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = 1 if (want_logits and last_chunk and i == len(chunk) - 1) else 0
            rc = L.llama_decode(self._ctx, b)
            if rc != 0:
                # the cache may hold part of this chunk: forget it all rather than trust it
                self.reset()
                raise RuntimeError(f"llama_decode failed with code {rc}")
            self._cached.extend(chunk)
            self.n_evaluated += len(chunk)

    def set_prefix(self, tokens: list[int]) -> None:
        """Make sequence 0 hold exactly `tokens`, decoded as one batch from an empty cache (a fixed
        schedule: llama.cpp's CPU kernels give results that depend on how tokens are batched).
        Nothing is redone if it already does: only this method writes sequence 0, always whole."""
        if self._cached == tokens:
            return
        if len(tokens) > self.n_ctx:
            raise ContextOverflow(len(tokens), self.n_ctx)
        self.reset()
        self._decode(tokens, 0, want_logits=False)

    def decode_rows(self, tokens: list[int], pos: list[int], seqs: list[tuple[int, ...]],
                    outputs: dict[int, np.ndarray], hidden: Collection[int] = ()) -> dict[int, np.ndarray]:
        """Decode a token tree: row i is token i at position pos[i] in sequences seqs[i].

        Rows in several sequences are shared (an item's tokens, read by each criterion's cue).
        `outputs` maps a row to the token ids whose logits to return for it; a row in `hidden` gets
        its final hidden state instead (llama.cpp's "result_norm", float32, n_embd: what a linear
        head reads). Sequences other than 0 must be empty or copied from 0 (copy_prefix) before,
        and are dropped (drop) after.
        """
        return self.decode_tree(tokens, pos, seqs, outputs, hidden)[0]

    def decode_tree(self, tokens: list[int], pos: list[int], seqs: list[tuple[int, ...]],
                    outputs: dict[int, np.ndarray], hidden: Collection[int] = (),
                    taps: Mapping[int, Collection[int]] | None = None
                    ) -> tuple[dict[int, np.ndarray], dict[tuple[int, int], np.ndarray]]:
        """decode_rows, and with `taps` (layer -> rows) the residual stream after each such layer at
        those rows ((layer, row) -> float32 n_embd; any row, not only output rows; a layer from 0 to
        n_layer - 2)."""
        L = _lib()
        b = self._batch
        cap = self._capture
        got: dict[int, np.ndarray] = {}
        tapped: dict[tuple[int, int], np.ndarray] = {}
        hidden = frozenset(hidden)
        taps = {layer: frozenset(rows) for layer, rows in (taps or {}).items() if rows}
        if (hidden or taps) and (self._cb is None or (outputs and self.head is None)):
            raise ModelError(f"{self.path}: hidden states are read with the answer-only output head, which this "
                             f"engine does not use ({self.head_check.get('reason')}); the head route needs it")
        if any(not 0 <= layer < self.n_layer - 1 for layer in taps):
            raise ModelError(f"{self.path}: layers {sorted(taps)} tapped; this model's run from 0 to "
                             f"{self.n_layer - 2} (the last layer's output is the final hidden state)")
        for start in range(0, len(tokens), self.n_batch):
            end = min(start + self.n_batch, len(tokens))
            b.n_tokens = end - start
            out_rows = []
            for i in range(start, end):
                k = i - start
                b.token[k] = tokens[i]
                b.pos[k] = pos[i]
                b.n_seq_id[k] = len(seqs[i])
                for j, sq in enumerate(seqs[i]):
                    b.seq_id[k][j] = sq
                wanted = i in outputs or i in hidden
                b.logits[k] = wanted
                if wanted:
                    out_rows.append(i)
            cap.rows, cap.bad, cap.taps = [], None, {}
            capturing = cap.on = (self.head is not None or bool(hidden)) and bool(out_rows)
            here = {layer: [i for i in rows if start <= i < end] for layer, rows in taps.items()}
            cap.layers = {f"l_out-{layer}".encode(): layer for layer, rows in here.items() if rows}
            try:
                rc = L.llama_decode(self._ctx, b)
            finally:
                cap.on, cap.layers = False, {}
            if rc != 0:
                self.reset()
                raise RuntimeError(f"llama_decode failed with code {rc}")
            self.n_evaluated += end - start
            for layer, rows in here.items():
                if not rows:
                    continue
                arr = cap.taps.get(layer)
                if cap.bad or arr is None or arr.size != (end - start) * self.n_embd:
                    self.reset()
                    raise RuntimeError(f"{self.path}: layer {layer}'s output was not read whole from llama.cpp "
                                       f"({cap.bad or 'no such node, or of another size'})")
                arr = arr.reshape(end - start, self.n_embd)  # ggml: n_embd contiguous, a row a token
                for i in rows:
                    tapped[(layer, i)] = arr[i - start].copy()
            if capturing:
                states = np.concatenate(cap.rows) if cap.rows else np.empty(0, np.float32)
                if cap.bad or states.size != len(out_rows) * self.n_embd:
                    self.reset()
                    raise RuntimeError(f"{self.path}: expected {len(out_rows)} hidden states of {self.n_embd} "
                                       f"from llama.cpp, got {states.size} values ({cap.bad or 'wrong count'}); "
                                       f"run with answer_head=False")
                states = states.reshape(len(out_rows), self.n_embd)  # outputs come in batch order
                for k, i in enumerate(out_rows):
                    if i in hidden:
                        got[i] = states[k].copy()
                    else:
                        assert self.head is not None
                        got[i] = self.head.logits(states[k], outputs[i])
            else:
                for i in out_rows:
                    row = np.ctypeslib.as_array(L.llama_get_logits_ith(self._ctx, i - start), shape=(self.n_vocab,))
                    got[i] = row[outputs[i]].copy()
        return got, tapped

    # a fixed probe: the check must not depend on which item a job happens to start with
    _PROBE = ("The committee reviewed every answer twice, and the scores it gave were written down "
              "before anyone compared them. Rate the text from 1 to 5:")

    def _check_head(self) -> None:
        """Use the answer-only output head if its logits agree with llama.cpp's on a fixed probe.

        llama.cpp quantizes the hidden state to 8 bits before its output layer on CPU (~1% of a
        logit, measured on Gemma 3 270M: at most 0.18 on logits up to 18), so the test is relative:
        every compared logit within 3% of the largest magnitude. A transform this module does not
        apply (a logit scale, a bias) moves logits by far more, and the engine keeps llama.cpp's.
        """
        try:
            arch = self.model.meta("general.architecture") or ""
            cap = self.model.meta(f"{arch}.final_logit_softcapping")
            head = OutputHead.from_gguf(self.model.weights_path, softcap=float(cap) if cap else None)
        except (GGUFFormatError, OSError, KeyError, NotImplementedError, ValueError) as e:
            self.head_check = {"used": False, "reason": f"output layer not readable: {e}"}
            log.info("%s: scoring uses llama.cpp's output layer (%s)", self.path, self.head_check["reason"])
            return
        if head.n_vocab != self.n_vocab or head.n_embd != self.n_embd:
            self.head_check = {"used": False, "reason": f"output matrix {head.n_embd}x{head.n_vocab} does not "
                                                        f"match the model's {self.n_embd}x{self.n_vocab}"}
            return
        probe = self.tokenize(self._PROBE)[: self.n_ctx]
        row = len(probe) - 1  # one: a fresh context keeps a single output row (n_outputs_max)
        pos = list(range(len(probe)))
        seqs: list[tuple[int, ...]] = [(0,)] * len(probe)
        self.reset()
        ref = self.decode_rows(probe, pos, seqs, {row: np.arange(self.n_vocab, dtype=np.int64)})[row]
        # the largest logits (where labels are decided) and a spread over the vocabulary
        ids = np.unique(np.concatenate([np.argsort(ref)[-16:], np.linspace(0, self.n_vocab - 1, 48).astype(np.int64)]))
        self.reset()
        self.head = head
        try:
            mine = self.decode_rows(probe, pos, seqs, {row: ids})[row]
        except RuntimeError as e:
            self.head = None
            self.head_check = {"used": False, "reason": str(e)}
            return
        finally:
            self.reset()
        err = float(np.abs(mine - ref[ids]).max())
        scale = max(1.0, float(np.abs(ref[ids]).max()))
        used = err <= 0.03 * scale
        self.head_check = {"used": used, "max_abs_error": round(err, 5), "max_abs_logit": round(scale, 3),
                           "tensor": head.info.name, "type": head.info.qtype.name,
                           "reason": "agrees with llama.cpp's logits" if used else "disagrees with llama.cpp's logits"}
        if not used:
            self.head = None
            log.warning("%s: the answer-only output head %s (max error %.3g on logits up to %.3g); using "
                        "llama.cpp's output layer, which is slower", self.path, self.head_check["reason"], err, scale)
        else:
            log.debug("%s: answer-only output head: %s", self.path, self.head_check)

    def copy_prefix(self, dst: int, n: int, src: int = 0) -> None:
        """Let sequence `dst` see the first `n` positions of `src` (shares cells, copies nothing)."""
        _lib().llama_memory_seq_cp(self._mem, src, dst, 0, n)

    def drop(self, seqs: list[int]) -> None:
        """Forget sequences (not 0): their own cells are freed, shared ones stay with sequence 0."""
        L = _lib()
        for sq in seqs:
            L.llama_memory_seq_rm(self._mem, sq, -1, -1)

    def reset(self) -> None:
        _lib().llama_memory_clear(self._mem, True)
        self._cached = []

    def close(self) -> None:
        """Free the context, and the model when this engine loaded it (one handed in stays open)."""
        self._free_context()
        if getattr(self, "model", None) is not None and getattr(self, "_owns_model", False):
            self.model.close()

    def __enter__(self) -> LlamaEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
