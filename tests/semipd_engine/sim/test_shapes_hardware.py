"""Model shapes, GPU presets, the calibration file, the share model, and the no-torch import rule."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from semipd_engine.model.presets import PRESETS
from semipd_engine.sim.hardware import SPECS, Curve, Hardware, hardware_names, load_calibration
from semipd_engine.sim.shapes import BUILTIN_VOCAB_SIZE, ModelShape, model_names
from semipd_engine.sim.share import MUXSERVE_DECODE_A100, MUXSERVE_PREFILL_A100, ShareModel, ShareModels


def test_public_shapes_match_published_sizes():
    assert ModelShape.preset("llama3-8b").params() == 8_030_261_248
    assert ModelShape.preset("llama3-70b").params() == 70_553_706_496
    assert ModelShape.preset("llama3-8b").kv_bytes_per_token(2) == 2 * 32 * 8 * 128 * 2
    assert 6.7e9 < ModelShape.preset("llama-2-7b").params() < 6.8e9
    assert 7.6e9 < ModelShape.preset("qwen2.5-7b").params() < 7.7e9
    assert ModelShape.preset("llama3-8b").weight_bytes(2) == 2 * 8_030_261_248


def test_cpu_presets_use_the_builtin_tokenizer_vocab():
    from semipd_engine.serving.tokenizer import BUILTIN_VOCAB_SIZE as engine_vocab

    assert BUILTIN_VOCAB_SIZE == engine_vocab
    for name, p in PRESETS.items():
        s = ModelShape.preset(name)
        assert (s.num_layers, s.hidden_size, s.num_heads, s.num_kv_heads) == (
            p["num_hidden_layers"], p["hidden_size"], p["num_attention_heads"], p["num_key_value_heads"])
        assert s.vocab_size == BUILTIN_VOCAB_SIZE
    assert ModelShape.preset("tiny-qwen2").tie_word_embeddings
    assert ModelShape.preset("tiny", vocab_size=1000).vocab_size == 1000
    assert set(model_names()) >= {"llama3-8b", "llama3-70b", "llama-2-7b", "qwen2.5-7b", *PRESETS}


def test_from_hf_config(tmp_path):
    cfg = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 512,
           "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 1000, "max_position_embeddings": 2048}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    s = ModelShape.from_hf_config(tmp_path)
    assert (s.name, s.head_dim, s.num_kv_heads, s.tie_word_embeddings) == (tmp_path.name, 32, 2, False)
    assert ModelShape.from_hf_config(tmp_path / "config.json", name="x").name == "x"
    with pytest.raises(ValueError, match="model.path"):
        ModelShape.from_hf_config(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model.path"):
        ModelShape.from_hf_config(tmp_path)


def test_hardware_specs():
    a100 = Hardware.preset("a100-40g")
    assert (a100.peak_flops, a100.mem_bw, a100.num_sms, a100.link_bw) == (312e12, 1.555e12, 108, 300e9)
    h200 = Hardware.preset("h200")
    assert (h200.peak_flops, h200.mem_bw, h200.mem_bytes) == (989e12, 4.8e12, 141 * 2**30)
    assert hardware_names() == ["a100-40g", "a100-80g", "h100", "h200", "h800"]


def test_curve_interpolates_as_a_power_law_and_clamps():
    c = Curve((1.0, 100.0), (0.01, 1.0))
    assert c(0.5) == 0.01 and c(1e6) == 1.0
    assert c(10.0) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        Curve((2.0, 1.0), (1.0, 1.0))


def test_curve_many_is_the_curve_at_each_value_to_the_bit():
    c = Curve((1.0, 4.0, 50.0, 1e4), (0.2, 0.5, 0.55, 0.9))
    rising = [0.5, 1.0, 1.5, 3.999, 4.0, 4.0, 17.0, 49.9, 50.0, 51.0, 9e3, 1e4, 2e4]
    for xs in (rising, rising[::-1], [17.0, 0.3, 5e3, 4.0, 2.0, 2.0, 1e9, 60.0], []):
        assert c.many(xs) == [c(x) for x in xs]
    assert Curve.constant(0.7).many([0.1, 1.0, 10.0]) == [0.7] * 3


def test_calibration_file_has_what_the_roofline_reads():
    cal = load_calibration()
    prov = cal["provenance"]
    assert "aiconfigurator-core==0.12.0" in prov["package"] and prov["files"] and prov["date"] and prov["command"]
    for key in {s["calibration"] for s in SPECS.values()}:
        e = cal["systems"][key]
        curves = [(e["gemm"]["compute_eff"], 1.0), (e["gemm"]["bw_eff"], 1.0), (e["prefill_attn"]["compute_eff"], 1.5),
                  (e["decode_attn"]["bw_eff"], 1.0)] + [(v["bw_eff"], 1.0) for v in e["allreduce"]["tp"].values()]
        for c, power in curves:
            xs, ys = c["x"], c["y"]
            assert len(xs) == len(ys) >= 1 and all(0 < y <= 1 for y in ys)
            # time ~ x**power / y(x) never falls as work grows
            assert all(b ** power / yb >= a ** power / ya for a, b, ya, yb in zip(xs, xs[1:], ys, ys[1:]))
        for k in ("floor_s",):
            assert 0 < e["gemm"][k] < 1e-4 and 0 < e["prefill_attn"][k] < 1e-4 and 0 < e["decode_attn"][k] < 1e-4
        assert 0 < e["decode_attn"]["per_cta_s"] < 1e-6
        assert 0 < e["elementwise"]["bw_eff"] <= 1 and 0 < e["elementwise"]["floor_s"] < 1e-4
        assert {"2", "4", "8"} <= set(e["allreduce"]["tp"])
        assert set(cal["fit_error"][key]) == {"gemm", "prefill_attn", "decode_attn", "allreduce"}
    for name in hardware_names():
        Hardware.preset(name)


def test_share_model():
    assert MUXSERVE_DECODE_A100.factor(100) == pytest.approx(1.0)
    assert MUXSERVE_DECODE_A100.factor(50) == pytest.approx((0.41 * 2 + 0.57) / 0.98)
    assert MUXSERVE_PREFILL_A100.factor(50) > MUXSERVE_DECODE_A100.factor(50) > 1.0
    fit = ShareModel.fit([20, 40, 60, 80, 100], [3.0 * (0.6 * 100 / s + 0.4) for s in (20, 40, 60, 80, 100)])
    assert (fit.a, fit.b) == (pytest.approx(0.6), pytest.approx(0.4))
    with pytest.raises(ValueError):
        ShareModel.fit([50, 50], [1.0, 1.0])
    with pytest.raises(ValueError):
        MUXSERVE_DECODE_A100.factor(0)
    sm = ShareModels()
    alone = sm.time("decode", 0.01, 50, memory_bound_s=0.008)
    assert alone == pytest.approx(0.01 * MUXSERVE_DECODE_A100.factor(50))
    shared = sm.time("decode", 0.01, 50, memory_bound_s=0.008, other_running=True)
    assert shared == pytest.approx((0.01 + (sm.contention - 1) * 0.008) * MUXSERVE_DECODE_A100.factor(50))
    assert ShareModels(contention=1.0).time("prefill", 0.1, 100, 0.05, True) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        sm.time("both", 0.01, 50)


def test_sim_modules_import_without_torch():
    code = (
        "import sys\n"
        "import semipd_engine.sim, semipd_engine.sim.batch, semipd_engine.sim.shapes, semipd_engine.sim.hardware\n"
        "import semipd_engine.sim.roofline, semipd_engine.sim.share, semipd_engine.sim.calibration.derive\n"
        "from semipd_engine.sim.roofline import RooflineCostModel\n"
        "from semipd_engine.sim.shapes import ModelShape\n"
        "from semipd_engine.sim.hardware import Hardware\n"
        "from semipd_engine.sim.batch import BatchShape\n"
        "m = RooflineCostModel(ModelShape.preset('llama3-8b'), Hardware.preset('h100'))\n"
        "assert m.iteration_time(BatchShape.of([(0, 100, True)])) > 0\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'transformers', 'tokenizers'))\n"
        "engine = sorted(k for k in sys.modules if k.startswith('semipd_engine') and not k.startswith("
        "'semipd_engine.sim') and k not in ('semipd_engine', 'semipd_engine.model', 'semipd_engine.model.presets',"
        " 'semipd_engine.model.spec'))\n"
        "assert not bad and not engine, (bad, engine)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
