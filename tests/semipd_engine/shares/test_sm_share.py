"""SM shares: the arithmetic and rounding, what a green context share creates on a switch, `auto` on a GPU, the
share control's messages and MPS environment. The CUDA calls go through a recording fake; the real ones are in the
`gpu`-marked test at the end."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from semipd_engine.core.messages import SetShare, ShareSwitched
from semipd_engine.process.engine_client import ShareControl
from semipd_engine.shares import sm_share
from semipd_engine.shares.partition import Partition, resolve_backend
from semipd_engine.shares.sm_share import GreenContextShare, mps_env, sm_count, sm_granularity

H100 = (132, 9)  # SMs, compute capability major: groups of 8, and 132 is not a multiple of 8
A100 = (108, 8)  # groups of 2


@pytest.mark.parametrize("device, share, sms", [
    (H100, 50, 64), (H100, 30, 40), (H100, 1, 8), (H100, 99, 128), (H100, 100, 0),
    (A100, 50, 54), (A100, 30, 32), (A100, 1, 2), (A100, 99, 106), (A100, 100, 0),
    ((16, 9), 99, 0),  # every group, and the groups are every SM: no context needed
])
def test_a_share_is_the_nearest_whole_group_of_sms(device, share, sms):
    total, major = device
    assert sm_count(share, total, sm_granularity(major)) == sms


class FakeApi:
    def __init__(self, device=H100):
        self.dev, self.calls = device, []

    def device(self):
        return self.dev

    def create(self, num_sms):
        self.calls.append(("create", num_sms))
        return SimpleNamespace(sms=num_sms)

    def use(self, ctx):
        self.calls.append(("use", None if ctx is None else ctx.sms))

    def drain(self):
        self.calls.append(("drain",))


def test_a_context_is_made_only_when_the_sm_count_changes_and_the_old_stream_drains_first():
    api = FakeApi()
    share = GreenContextShare(api)
    assert share.apply(50) == 64
    assert share.apply(51) == 64  # 67 SMs round to the same 8 groups: nothing is made
    assert share.apply(70) == 96
    assert share.apply(100) == 0  # uncapped: back on the device's own stream, no context
    assert share.apply(100) == 0
    assert api.calls == [("drain",), ("create", 64), ("use", 64), ("drain",), ("create", 96), ("use", 96),
                         ("drain",), ("use", None)]
    assert share.created == [64, 96] and share.ctx is None


def test_auto_on_a_gpu_picks_green_contexts_then_mps_else_refuses_with_both_reasons(monkeypatch):
    why = {"green_context": None, "mps": None}
    monkeypatch.setattr(sm_share, "green_context_available", lambda device: why["green_context"])
    monkeypatch.setattr(sm_share, "mps_available", lambda device: why["mps"])
    assert resolve_backend("auto", "cuda") == "green_context"
    why["green_context"] = "built without green contexts"
    assert resolve_backend("auto", "cuda") == "mps"
    why["mps"] = "no MPS control daemon"
    with pytest.raises(ValueError, match="built without green contexts.*no MPS control daemon.*partition_backend=none"):
        resolve_backend("auto", "cuda")
    assert resolve_backend("mps", "cuda") == "none"  # by name: uncapped, saying why (logged)


def test_mps_needs_its_daemons_pipe(monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    assert "nvidia-cuda-mps-control -d" in sm_share.mps_available("cuda")
    (tmp_path / "control").touch()
    assert sm_share.mps_available("cuda") is None
    assert mps_env(30) == {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "30"} and mps_env(100) == {}


def _control(backend, partition=Partition(70, 30)):
    sent = []
    ctl = ShareControl("prefill", "decode", partition, backend, (0, 1), 0, lambda w, m: sent.append((w, m)),
                       sm_device=lambda: SimpleNamespace(device=lambda: H100))
    return ctl, sent


def test_green_context_shares_switch_by_message_and_say_their_sms():
    ctl, sent = _control("green_context")
    assert ctl.placement("prefill") == (None, 0) and ctl.worker_env("prefill") == {}
    d = ctl.describe()
    assert (d["prefill_sms"], d["decode_sms"], d["device_sms"]) == (96, 40, 132)
    ctl.set_partition(Partition(70, 60))  # only decode's share changed: only decode is told
    assert [(w, m.share) for w, m in sent] == [("decode", 60)] and isinstance(sent[0][1], SetShare)
    assert ctl.describe()["decode_sms"] == 80
    ctl.set_partition(Partition(100, 60))
    assert ctl.describe()["prefill_sms"] == 132  # uncapped: the whole device


def test_mps_shares_are_fixed_when_a_worker_starts_and_switch_by_a_new_process():
    ctl, sent = _control("mps")
    assert ctl.worker_env("prefill") == {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "70"}
    assert ctl.worker_env("decode") == {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "30"}
    assert ctl.worker_env("other") == {}
    with pytest.raises(ValueError, match="cannot replace its workers"):  # no engine to start a standby
        ctl.set_partition(Partition(50, 50))
    assert sent == []
    restarted = []
    ctl = ShareControl("prefill", "decode", Partition(70, 30), "mps", (0, 1), 0, lambda w, m: sent.append((w, m)),
                       restart=lambda w, t: restarted.append((w, ctl.worker_env(w))))
    ctl.set_partition(Partition(70, 100))  # only decode changed; uncapped: no percentage at all
    assert restarted == [("decode", {})] and sent == []
    ctl.running("decode", 30)  # its standby failed: the old share is what runs
    assert ctl.describe()["decode_share"] == 30


def test_a_worker_applies_its_sm_share_at_the_message_and_reports_the_sms():
    from semipd_engine.process.worker import Worker, WorkerSpec

    out = []
    api = FakeApi()
    core = SimpleNamespace(executor=SimpleNamespace(device=None))
    w = Worker(WorkerSpec("decode", "decode_only", "decode", sm_backend="green_context", share=30), core, None,
               SimpleNamespace(put=out.append), {}, None, sm=GreenContextShare(api))
    w.on_share(SetShare(None, 50, 0.0))
    assert isinstance(out[0], ShareSwitched) and (out[0].share, out[0].sms, out[0].cores) == (50, 64, ())
    assert ("create", 64) in api.calls


@pytest.mark.gpu
def test_a_green_context_runs_kernels_on_its_share_of_the_sms():
    import torch

    if sm_share.green_context_available("cuda") is not None:
        pytest.skip(sm_share.green_context_available("cuda"))
    share = GreenContextShare(sm_share.TorchGreenContexts(torch.cuda.current_device()))
    total, major = share.api.device()
    n = share.apply(50)
    assert n == sm_count(50, total, sm_granularity(major)) and 0 < n < total
    a = torch.randn(1024, 1024, device="cuda")
    b = a @ a  # on the green context's stream
    share.apply(100)
    torch.cuda.synchronize()
    assert torch.allclose(b, a @ a)
