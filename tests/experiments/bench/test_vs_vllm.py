"""The vLLM side-by-side benchmark's own path, this project's engine alone on a tiny checkpoint (vLLM's side runs
in the `external` tests, where vLLM is installed)."""

import json

import pytest

from experiments.bench import vs_vllm as bench


def test_our_engine_alone_gives_every_measurement(tmp_path, capsys):
    out = tmp_path / "vs.json"
    res = bench.main(["--engines", "unified", "--model", "tiny", "--offline-requests", "4", "--rates", "8",
                      "--rate-requests", "6", "--batches", "1,2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    (ours,) = res["results"]
    assert ours["engine"] == "unified" and ours["warmup_ok"] == 4 + 6
    assert ours["offline"]["requests"] == 4 and ours["offline"]["errors"] == 0
    assert ours["offline"]["output_tok_s"] > 0 and ours["offline"]["total_tok_s"] > ours["offline"]["output_tok_s"]
    (rate,) = ours["rates"]
    assert rate["rate"] == 8 and rate["ok"] == 6 and 0 < rate["ttft_s"]["p50"] <= rate["ttft_s"]["p90"]
    assert [d["batch"] for d in ours["decode"]] == [1, 2]
    for d in ours["decode"]:
        assert d["step_s"] > 0 and d["floor_s"] > 0 and d["ratio_to_floor"] == pytest.approx(d["step_s"] / d["floor_s"])
    assert "| unified |" in capsys.readouterr().out  # the table


def test_the_decode_floor_streams_the_weights_once_and_gathers_the_embedding():
    from semipd_engine.config import ModelConfig, freeze
    from semipd_engine.model import resolve

    spec = resolve(freeze(ModelConfig, {"name": "llama-100m"})).spec
    w = spec.num_params() * 2
    one = bench.decode_floor(spec, 1, 100, 2, w, 1e9)
    # untied: the embedding table is read one row per sequence, not streamed
    gathered = (spec.vocab_size - 1) * spec.hidden_size * 2 if not spec.tie_word_embeddings else 0
    assert one == pytest.approx((w - gathered + 100 * spec.kv_bytes_per_token(2)) / 1e9)
    assert bench.decode_floor(spec, 8, 100, 2, w, 1e9) > one  # more sequences: more KV (and embedding rows)


def test_vllm_engines_need_vllms_python():
    with pytest.raises(SystemExit, match="--vllm-python"):
        bench.compose_job("vllm", "/no/ckpt", "bfloat16", None)
