"""llama-cpp-python's library, loaded once: its logging routed to Python's, the backend
initialised, and ggml's tensor accessors (which the bindings do not declare) given their types.
The engine (runtime/engine.py), the CPU checks (runtime/cpu.py) and export's quantizer build on it:

    L = lib()                     # the llama_cpp module, ready
    G = ggml_lib()                # ggml_get_name, ggml_nbytes, ggml_backend_tensor_get, ...
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

log = logging.getLogger("edge_annotator.runtime.engine")  # llama.cpp's lines, where they always were

_llama = None
_log_cb = None  # keep the ctypes callback alive for as long as llama.cpp may call it
_ggml = None


def lib() -> Any:
    """Import llama_cpp once, route its logging to Python's, and initialise the backend."""
    global _llama, _log_cb
    if _llama is None:
        import llama_cpp

        @llama_cpp.llama_log_callback
        def _cb(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            msg = text.decode("utf-8", errors="replace").rstrip()
            if msg:
                # ggml_log_level: 1 debug, 2 info, 3 warn, 4 error, 5 continuation. Its warnings are
                # about model quirks a user cannot act on (they show with -vv); errors surface.
                log.log(logging.WARNING if level == 4 else logging.DEBUG, "llama.cpp: %s", msg)

        _log_cb = _cb
        llama_cpp.llama_log_set(_log_cb, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _llama = llama_cpp
    return _llama


def llama_backend() -> Any:
    """The llama_cpp module with its backend initialised and its logging routed to Python's, for
    calls the engine does not wrap (export's quantizer)."""
    return lib()


def ggml_lib() -> ctypes.CDLL:
    """ggml's tensor accessors, through libllama (dlsym searches the libraries it links)."""
    global _ggml
    if _ggml is None:
        import llama_cpp.llama_cpp as ll

        g = ctypes.CDLL(ll._lib._name)  # a handle of our own: argtypes set here stay ours
        g.ggml_get_name.restype = ctypes.c_char_p
        g.ggml_get_name.argtypes = [ctypes.c_void_p]
        g.ggml_nelements.restype = ctypes.c_int64
        g.ggml_nelements.argtypes = [ctypes.c_void_p]
        g.ggml_nbytes.restype = ctypes.c_size_t
        g.ggml_nbytes.argtypes = [ctypes.c_void_p]
        g.ggml_backend_tensor_get.restype = None
        g.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        _ggml = g
    return _ggml


def gpu_offload_supported() -> bool:
    """Whether this llama-cpp-python build has a GPU backend (CUDA, Metal, Vulkan, ...)."""
    return bool(lib().llama_supports_gpu_offload())
