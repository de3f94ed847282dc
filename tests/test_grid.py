"""Quantization-aware training on the base GGUF's grid and the grid route (hf/quant_grid.py, train/qat.py,
export/grid_route.py): the block codec against gguf-py, the straight-through snap, and a tiny Llama 3
made from its own Q4_K_M file trained with qat: true, exported into that file's blocks, parity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import DATA, ROOT, TASKS
from gguf import GGMLQuantizationType as T

from edge_annotator.hf.quant_grid import LAYOUTS, GridError, read_grid, snap, torch_grid
from edge_annotator.runtime.cli import cli
from edge_annotator.runtime.gguf_file import read_tensor_infos, tensor_data


def random_blocks(qtype: T, n: int, rng: np.random.Generator) -> np.ndarray:
    """N blocks of QTYPE with random codes and scales, their fp16 scales finite and of weights' size."""
    lay = LAYOUTS[qtype]
    b = rng.integers(0, 256, size=(n, lay.size), dtype=np.uint8)
    d = lambda: rng.uniform(1e-4, 1e-2, size=(n, 1)).astype(np.float16).view(np.uint8)  # noqa: E731
    if qtype == T.Q6_K:
        b[:, 208:210] = d()
    else:
        b[:, 0:2] = d()
        if qtype in (T.Q4_K, T.Q5_K):
            b[:, 2:4] = d()
    b[0, :2] = 0  # one block whose scale is zero (d = 0): its codes cannot move
    if qtype == T.Q6_K:
        b[0, 208:210] = 0
    return b


@pytest.mark.parametrize("qtype", list(LAYOUTS), ids=lambda t: t.name)
def test_the_codec_reads_and_writes_blocks_as_gguf_py_does(qtype: T) -> None:
    """Codes and scales read from blocks dequantize to gguf-py's floats, bit for bit; writing the
    codes back gives the same bytes; new codes written and read again are those codes, every scale
    byte kept; each weight encodes to its own code, and to it again when moved by less than half a step."""
    import gguf

    rng = np.random.default_rng(0)
    lay = LAYOUTS[qtype]
    raw = random_blocks(qtype, 12, rng).reshape(3, -1)  # 3 rows of 4 blocks
    g = read_grid(raw, qtype)
    w = g.dequantize(g.codes)
    np.testing.assert_array_equal(w, gguf.quants.dequantize(raw, qtype))
    np.testing.assert_array_equal(g.with_codes(g.codes), raw)
    np.testing.assert_array_equal(g.encode(w), g.codes)
    step = np.repeat(g.scale, lay.sub, axis=1)
    np.testing.assert_array_equal(g.encode(w + 0.4 * step * rng.uniform(-1, 1, w.shape)), g.codes)
    q = rng.integers(lay.qmin, lay.qmax + 1, size=g.codes.shape).astype(np.int16)
    g2 = read_grid(g.with_codes(q), qtype)
    zero_scale = np.repeat(g.scale == 0, lay.sub, axis=1)
    np.testing.assert_array_equal(g2.codes, q)
    np.testing.assert_array_equal(g2.scale, g.scale)
    np.testing.assert_array_equal(g.encode(g.dequantize(q))[~zero_scale], q[~zero_scale])
    np.testing.assert_array_equal(g.encode(g.dequantize(q))[zero_scale], g.codes[zero_scale])  # kept


def test_a_type_without_a_grid_is_refused() -> None:
    with pytest.raises(GridError, match="Q4_1: no grid"):
        read_grid(np.zeros((1, 20), np.uint8), T.Q4_1)
    with pytest.raises(GridError, match="not whole blocks"):
        read_grid(np.zeros((1, 100), np.uint8), T.Q4_K)


def test_snap_is_on_the_grid_and_a_qat_layer_passes_the_lora_gradient_straight_through() -> None:
    """snap gives Grid.dequantize of the nearest codes (the export's floats). A LoRA layer on the grid
    computes x @ snap(W0 + s B A)^T; the input's gradient is the snapped weight's, and A and B get the
    gradients of PEFT's LoRA branch, as if the update were not rounded."""
    from peft import LoraConfig, get_peft_model

    from edge_annotator.train.qat import attach, lora_layers, train_on_grid

    rng = np.random.default_rng(1)
    g = read_grid(random_blocks(T.Q4_K, 4, rng).reshape(2, -1), T.Q4_K)
    tg = torch_grid(g)
    w0 = torch.from_numpy(g.dequantize(g.codes))
    assert torch.equal(snap(w0, tg), w0)  # the base's own weights are grid points
    w = w0 + 0.01 * torch.from_numpy(rng.standard_normal(w0.shape).astype(np.float32))
    np.testing.assert_array_equal(snap(w, tg).numpy(), g.dequantize(g.encode(w.numpy())))

    lin = torch.nn.Linear(512, 2, bias=False)
    lin.weight.data.copy_(w0)
    model = get_peft_model(torch.nn.Sequential(lin), LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    layer = lora_layers(model)["0.weight"]
    for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
        p.data.normal_(0.0, 0.3)  # an update of some steps' size
    attach(model, {"0.weight": tg})
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    wq = snap(w0 + s * (b @ a).detach(), tg)
    assert (wq != w0).any()
    x = torch.randn(3, 512, requires_grad=True)
    r = torch.randn(3, 2)
    y = model(x)
    assert torch.equal(y, x @ wq.T)
    (y * r).sum().backward()
    torch.testing.assert_close(x.grad, r @ wq)
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    (r * (x.detach() @ a2.T @ b2.T) * s).sum().backward()
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(b.grad, b2.grad)
    # before the grid is switched on (qat_start), training runs PEFT's own forward; without gradients
    # (validation) the layer is on the grid all the same
    train_on_grid(model, False)
    torch.testing.assert_close(model(x), x @ (w0 + s * b @ a).T)
    with torch.no_grad():
        assert torch.equal(model(x), x @ wq.T)


def test_a_qat_config_needs_what_it_trains_on(tmp_path: Path) -> None:
    from edge_annotator.train.config import ConfigError, parse_config

    raw = yaml.safe_load((ROOT / "configs" / "tiny-lora-cpu.yaml").read_text())
    raw.update(qat=True, quantization="nf4", lora={"r": 8, "alpha": 16, "dropout": 0.1, "modules_to_save": ["norm"]})
    with pytest.raises(ConfigError) as e:
        parse_config(raw, "x.yaml", check_paths=False)
    for part in ("quantization: nf4", "tiny builds one from scratch", "lora.dropout 0", "modules_to_save"):
        assert part in str(e.value)


@pytest.mark.slow
def test_the_registry_base_lies_on_its_gguf_grid(gemma_path: Path, gemma_hf: Path) -> None:
    """Every block matrix of Gemma 3 270M's Q4_K_M file (Q4_K, Q6_K, Q5_0, Q8_0) round-trips through
    the codec byte for byte, and each adapted HF weight of the base folder is exactly its grid's floats."""
    from safetensors.numpy import load_file

    from edge_annotator.train.qat import hf_grids

    types = set()
    for t in read_tensor_infos(gemma_path).values():
        if t.name.startswith("blk.") and t.qtype in LAYOUTS:
            data = tensor_data(gemma_path, t)
            g = read_grid(data, t.qtype)
            np.testing.assert_array_equal(g.with_codes(g.encode(g.dequantize(g.codes))), data)
            types.add(t.qtype.name)
    assert types == {"Q4_K", "Q6_K", "Q5_0", "Q8_0"}
    weights = load_file(str(gemma_hf / "model.safetensors"))
    names = [k for k in weights if k.endswith(("_proj.weight",))]
    path, grids = hf_grids(gemma_hf, names)
    assert path.resolve() == gemma_path.resolve() and len(grids) == 18 * 7
    for k, g in grids.items():
        np.testing.assert_array_equal(g.dequantize(g.codes), weights[k])


def qat_config(base: Path, out: Path, **kw: object):
    """The tiny recipe's settings on a GGUF-made base (its own weights, no `tiny:`), trained with qat."""
    from edge_annotator.train.config import parse_config

    raw = yaml.safe_load((ROOT / "configs" / "tiny-lora-cpu.yaml").read_text())
    del raw["tiny"]
    raw.update(base_model=str(base), spec=str(TASKS / "emobank.yaml"), output=str(out), qat=True,
               train_data=str(DATA / "emobank-train-64.jsonl"), max_steps=6, eval_every=3, val_max_items=8,
               max_length=1024, lr=1e-2, calibrate=False)
    raw.update(kw)
    return parse_config(raw, out.name)


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama 3 (256 wide: K-quant rows), quantized to Q4_K_M by llama.cpp and made a base from
    that file as annotate-cli base does; a qat run on it and a plain LoRA run beside it."""
    from edge_annotator.export.hf_to_gguf import quantize, run_converter
    from edge_annotator.train.from_gguf import gguf_to_hf
    from edge_annotator.train.job import train_and_merge
    from edge_annotator.train.tiny import tiny_base

    tmp = tmp_path_factory.mktemp("qat")
    src = tiny_base("llama3", tmp / "src", hidden=256)
    run_converter(src, tmp / "src.f16.gguf", "f16")
    models = tmp / "models"
    models.mkdir()
    quantize(tmp / "src.f16.gguf", models / "tiny-llama-q4_k_m.gguf", "Q4_K_M")
    base = gguf_to_hf(models / "tiny-llama-q4_k_m.gguf", models / "tiny-llama-hf", tokenizer_dir=src)
    out: dict[str, Path] = {"gguf": models / "tiny-llama-q4_k_m.gguf", "base": base}
    for name, qat in (("qat", True), ("plain", False)):
        done = train_and_merge(qat_config(base, tmp / name, qat=qat))
        assert done.merged is not None
        out[name] = done.merged
    return out


@pytest.mark.slow
def test_a_qat_run_exports_into_its_base_files_blocks(qat_run: dict[str, Path], tmp_path: Path) -> None:
    """export picks the grid route for the qat run: one file with the base's tensors, types and shapes,
    the trained codes in the adapted matrices (Llama's q/k rows in llama.cpp's order) and every other
    tensor's bytes as they were; parity against the merged model passes at the 4-bit bounds with
    scores within 0.01 (the file holds the merged weights exactly; llama.cpp's kernels differ)."""

    from edge_annotator.export.parity import parity

    out = tmp_path / "qat.gguf"
    r = CliRunner().invoke(cli, ["export", str(qat_run["qat"]), "-o", str(out)])
    assert r.exit_code == 0, r.output
    man = json.loads(out.with_name(out.name + ".manifest.json").read_text())
    assert man["route"] == "grid" and man["matrices"] == 2 * 7 and man["weights_moved"] > 0
    b, got = read_tensor_infos(qat_run["gguf"]), read_tensor_infos(out)
    assert list(got) == list(b)
    moved = 0
    for t in got.values():
        assert t.qtype == b[t.name].qtype and t.shape == b[t.name].shape
        if not np.array_equal(tensor_data(out, t), tensor_data(qat_run["gguf"], b[t.name])):
            assert t.name.startswith("blk.") and t.name.endswith(("attn_q.weight", "attn_k.weight", "attn_v.weight",
                                                                  "attn_output.weight", "ffn_gate.weight",
                                                                  "ffn_up.weight", "ffn_down.weight")), t.name
            moved += 1
    assert moved == man["matrices_changed"] > 0
    assert {k for k in man["block_types"]} <= {"Q4_K", "Q6_K"} and man["block_bits_per_weight"] < 5.6
    rep = parity(qat_run["qat"], out, DATA / "emobank-test-50.jsonl", max_items=20, threads=2)
    assert rep["pass"], rep["checks"]
    assert rep["tokens"]["identical"] == rep["tokens"]["total"]
    assert all(c["score_delta_mean"] < 0.01 for c in rep["criteria"]), rep["criteria"]
    info = json.loads(CliRunner().invoke(cli, ["inspect", str(out), "--json", "--no-hash"]).stdout)
    assert info["provenance"]["export"]["route"] == "grid" and info["provenance"]["config"]["qat"] is True


@pytest.mark.slow
def test_the_grid_route_refuses_a_run_trained_off_the_grid(qat_run: dict[str, Path], tmp_path: Path) -> None:
    """A plain LoRA run's merged weights are not on the base's grid: --route grid says so in one line
    and names the routes that fit; auto takes the adapter route for it."""
    r = CliRunner().invoke(cli, ["export", str(qat_run["plain"]), "-o", str(tmp_path / "x.gguf"), "--route", "grid"])
    assert r.exit_code == 1 and "not on the grid" in r.output and "--route adapter" in r.output, r.output
    assert not list(tmp_path.iterdir())
    from edge_annotator.export.route import choose

    assert choose(qat_run["plain"], "Q4_K_M", "auto", None)[0] == "adapter"
    assert choose(qat_run["qat"], "Q4_K_M", "auto", None)[0] == "grid"
    assert choose(qat_run["qat"], "Q8_0", "auto", None)[0] == "merged"


@pytest.mark.slow
def test_qat_refuses_a_base_that_is_not_its_ggufs(qat_run: dict[str, Path], tmp_path: Path) -> None:
    """Training with qat on a base whose weights differ from the GGUF it names stops before training."""
    import shutil

    from safetensors.torch import load_file, save_file

    from edge_annotator.train.trainer import CannotLearn, train

    base = tmp_path / "models" / "tiny-llama-hf"
    shutil.copytree(qat_run["base"], base)
    shutil.copy(qat_run["gguf"], base.parent / qat_run["gguf"].name)
    w = load_file(str(base / "model.safetensors"))
    w["model.layers.0.mlp.up_proj.weight"] += 1e-3
    save_file(w, str(base / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CannotLearn, match="up_proj.weight is not what tiny-llama-q4_k_m.gguf dequantizes to"):
        train(qat_config(base, tmp_path / "run", max_steps=2))


@pytest.mark.slow
def test_a_qat_run_resumes_exactly_and_its_file_annotates_deterministically(qat_run: dict[str, Path],
                                                                             tmp_path: Path) -> None:
    """A qat run stopped after step 4 (its last checkpoint is step 3's) and resumed ends with the
    uninterrupted run's adapter; the grid file's output is byte-identical across threads, --resume
    and workers."""
    from safetensors.torch import load_file

    from edge_annotator.export.grid_route import export_grid
    from edge_annotator.train.trainer import train

    cfg = qat_config(qat_run["base"], tmp_path / "run")
    train(cfg, stop_after=4)
    train(cfg, resume=True)
    got = load_file(str(tmp_path / "run" / "checkpoint" / "adapter.safetensors"))
    want = load_file(str(qat_run["qat"].parent / "checkpoint" / "adapter.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)

    out = export_grid(qat_run["qat"], tmp_path / "a.gguf", qat_run["gguf"]).output
    items = DATA / "emobank-test-50.jsonl"
    runs = {}
    for name, extra in (("t1", ["--threads", "1"]), ("t2", ["--threads", "2"]), ("w2", ["--workers", "2"])):
        f = tmp_path / f"{name}.jsonl"
        r = CliRunner().invoke(cli, ["annotate", str(out), str(items), "-o", str(f), *extra])
        assert r.exit_code == 0, r.output
        runs[name] = f.read_bytes()
    assert runs["t1"] == runs["t2"] == runs["w2"]
    part = tmp_path / "part.jsonl"
    part.write_bytes(b"".join(runs["t1"].splitlines(keepends=True)[:17]))
    r = CliRunner().invoke(cli, ["annotate", str(out), str(items), "-o", str(part), "--resume"])
    assert r.exit_code == 0 and part.read_bytes() == runs["t1"]


@pytest.mark.slow
def test_fit_qat_publishes_one_file_with_the_bases_blocks(qat_run: dict[str, Path], tmp_path: Path) -> None:
    """annotate-cli fit --qat on a base made from a GGUF: the recipe says qat, the export takes the
    grid route, parity passes, and the annotator is one file (no base placed beside it) whose blocks
    have the base file's types."""
    out = tmp_path / "emo.gguf"
    args = [str(TASKS / "emobank.yaml"), str(DATA / "emobank-train-64.jsonl"), "-o", str(out), "--base",
            str(qat_run["base"]), "--qat", "--budget", "1m", "--threads", "2"]
    r = CliRunner().invoke(cli, ["fit", *args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    state = json.loads((tmp_path / "emo.run" / "fit.json").read_text())
    assert state["recipe"]["qat"] is True and state["export"]["route"] == "grid" and state["parity"]["pass"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emo.gguf", "emo.gguf.manifest.json", "emo.run"]
    info = json.loads(CliRunner().invoke(cli, ["inspect", str(out), "--json", "--no-hash"]).stdout)
    assert info["provenance"]["config"]["qat"] is True and info["provenance"]["export"]["route"] == "grid"
