"""offload_activations: the hooks move exactly each checkpointed decoder layer's input, change no number
(LoRA with dropout, full, tiled MLP, a whole sft run), keep a device tensor until its copy was waited for,
prefetch the next one backward needs, and the config's refusals and checkpointing default."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from tests.training.helpers import logged_losses, run_config, train, tunesmith_messages
from tunesmith.model.compile import decoder_layers
from tunesmith.model.loader import enable_gradient_checkpointing
from tunesmith.model.offload import ActivationOffload, CudaOps, offload_layer_inputs
from tunesmith.model.tiled_mlp import tile_mlps
from tunesmith.model.tuning import TuningOptions, apply_tuning


class FakeOps:
    """A CPU stand-in for the device: "copies" are clones, events are numbers; every call is logged."""

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.moved: list[tuple[tuple[int, ...], bool]] = []  # to_host's tensors: (shape, is a Parameter)
        self.originals: list[weakref.ref] = []  # and the tensors themselves, to see when they are freed
        self.events = 0

    def handles(self, t: torch.Tensor) -> bool:
        return True

    def _event(self) -> int:
        self.events += 1
        return self.events

    def to_host(self, t: torch.Tensor) -> tuple[torch.Tensor, int]:
        self.moved.append((tuple(t.shape), isinstance(t, torch.nn.Parameter)))  # no reference kept
        self.originals.append(weakref.ref(t))
        event = self._event()
        self.log.append(("to_host", event))
        return t.detach().clone(), event

    def to_device(self, host: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, int]:
        event = self._event()
        self.log.append(("to_device", event))
        return host.clone(), event

    def wait(self, event: int, device: torch.device) -> None:
        self.log.append(("wait", event))


def _model(
    tiny_model_dir, method: str, *, ops: FakeOps | None, dropout: float = 0.0, tile: int | None = None
):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    enable_gradient_checkpointing(model)
    model = apply_tuning(
        model, TuningOptions(finetuning_type=method, lora_rank=4, lora_dropout=dropout)
    ).model
    if tile:
        tile_mlps(decoder_layers(model), tile)
    if ops is not None:  # min_bytes 0: the tiny model's layer inputs are 30 KiB
        offload_layer_inputs(decoder_layers(model), ActivationOffload(ops, min_bytes=0))
    return model.train()


def _loss_and_grads(model):
    ids = torch.randint(3, 200, (3, 40), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)  # the same dropout masks for both models
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "method,dropout,tile", [("lora", 0.0, None), ("lora", 0.3, None), ("full", 0.0, None), ("lora", 0.3, 16)]
)
def test_offloading_gives_the_same_loss_and_gradients(method, dropout, tile, tiny_model_dir):
    want = _loss_and_grads(_model(tiny_model_dir, method, ops=None, dropout=dropout, tile=tile))
    ops = FakeOps()
    got = _loss_and_grads(_model(tiny_model_dir, method, ops=ops, dropout=dropout, tile=tile))
    assert ops.moved, "nothing was offloaded"
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    assert got[1].keys() == want[1].keys() and len(got[1]) > 0
    for name, grad in want[1].items():
        torch.testing.assert_close(got[1][name], grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("method,tile", [("lora", None), ("full", None), ("lora", 16)])
def test_the_hooks_move_each_decoder_layers_input_and_nothing_else(method, tile, tiny_model_dir):
    """Non-reentrant checkpointing saves each layer's input through the hooks open around the layer: one
    [batch, tokens, hidden] tensor per layer, no weights, and no tensor the layer saves inside (with
    checkpointing off, or the hooks not installed, this list is wrong). A LoRA model's first input is a leaf
    that requires grad (transformers' enable_input_require_grads), which autograd holds anyway: it stays."""
    ops = FakeOps()
    model = _model(tiny_model_dir, method, ops=ops, tile=tile)
    layers = decoder_layers(model)
    inputs: list[torch.Tensor] = []
    seen = [layer.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for layer in layers]
    ids = torch.randint(3, 200, (3, 40))
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    for handle in seen:
        handle.remove()
    movable = [not (x.is_leaf and x.requires_grad) for x in inputs]
    assert len(inputs) == len(layers) == model.config.num_hidden_layers
    assert movable == ([False] + [True] * (len(layers) - 1) if method == "lora" else [True] * len(layers))
    assert ops.moved == [((3, 40, model.config.hidden_size), False)] * sum(movable)
    inputs.clear()
    # between forward and backward nothing else holds the moved "device" tensors (not the checkpoint
    # either), except the last one, whose copy is waited for when backward starts
    gc.collect()
    assert [r() is None for r in ops.originals] == [True] * (sum(movable) - 1) + [False]
    loss.backward()
    # backward brought every one back but the last (still on the device): one copy each, prefetched
    assert [kind for kind, _ in ops.log].count("to_device") == sum(movable) - 1


def test_a_layer_that_checkpoints_its_whole_call_moves_only_its_input(tiny_model_dir, monkeypatch):
    """transformers 5.17's GradientCheckpointingLayer checkpoints the module's whole `__call__` (forward
    hooks included), 5.24 only `forward`: the hooks wrap the checkpoint function, so with either one they
    see each layer's input alone, and losses and gradients are unchanged."""
    import functools

    from transformers.modeling_layers import GradientCheckpointingLayer

    def whole_call(self, *args, **kwargs):  # the module's hooks and forward, not checkpointed again (5.24's
        self.gradient_checkpointing = False  # forward checkpoints itself; 5.17's did not)
        try:
            return nn.Module.__call__(self, *args, **kwargs)
        finally:
            self.gradient_checkpointing = True

    def call_5_17(self, *args, **kwargs):
        if self.gradient_checkpointing and self.training:
            return self._gradient_checkpointing_func(functools.partial(whole_call, self, **kwargs), *args)
        return nn.Module.__call__(self, *args, **kwargs)

    monkeypatch.setattr(GradientCheckpointingLayer, "__call__", call_5_17)
    want = _loss_and_grads(_model(tiny_model_dir, "full", ops=None))
    ops = FakeOps()
    model = _model(tiny_model_dir, "full", ops=ops)
    got = _loss_and_grads(model)
    assert ops.moved == [((3, 40, model.config.hidden_size), False)] * model.config.num_hidden_layers
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    for name, grad in want[1].items():
        torch.testing.assert_close(got[1][name], grad, rtol=0, atol=0, msg=name)


def test_pack_keeps_the_device_tensor_until_its_copy_is_waited_for_and_unpack_prefetches():
    ops = FakeOps()
    offload = ActivationOffload(ops, min_bytes=1024)
    first, second = torch.randn(512), torch.randn(512)  # 2 KiB each
    want_first, want_second = first.clone(), second.clone()
    gone = weakref.ref(first)
    p1 = offload.pack(first)
    del first
    gc.collect()
    assert gone() is not None  # its copy (event 1) may still be running
    p2 = offload.pack(second)
    gc.collect()
    assert gone() is None and ops.log == [("to_host", 1), ("wait", 1), ("to_host", 2)]
    ops.log.clear()
    # backward starts with the last saved, still on the device (no round trip); the one before it is prefetched
    assert offload.unpack(p2) is second
    assert ops.log == [("to_device", 3)]
    ops.log.clear()
    torch.testing.assert_close(offload.unpack(p1), want_first, rtol=0, atol=0)
    assert ops.log == [("wait", 3)]  # prefetched: no second copy
    ops.log.clear()
    torch.testing.assert_close(offload.unpack(p1), want_first)  # unpacked again (retain_graph): copied again
    assert ops.log == [("to_device", 4), ("wait", 4)]
    ops.log.clear()
    torch.testing.assert_close(offload.unpack(p2), want_second, rtol=0, atol=0)  # now from host memory
    assert ops.log == [("to_device", 5), ("to_device", 6), ("wait", 5)]  # and p1 prefetched again


def test_small_tensors_weights_and_cpu_tensors_stay_where_they_are():
    ops = FakeOps()
    offload = ActivationOffload(ops, min_bytes=1024)
    small, weight = torch.randn(8), torch.nn.Parameter(torch.randn(1024))
    assert offload.pack(small) is small and offload.pack(weight) is weight and not ops.log
    cpu = torch.randn(2**20)  # 4 MiB, on the CPU: the real ops leave it alone
    assert ActivationOffload(CudaOps()).pack(cpu) is cpu


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="CudaOps' streams, events and pinned memory exist only on a CUDA GPU (CI has none; the FakeOps tests "
    "above cover the same bookkeeping); run on the device: pytest tests/training/test_offload_activations.py -k cuda",
)
def test_cuda_round_trip_frees_the_gpu_copy():
    offload = ActivationOffload(CudaOps())
    x = torch.randn(4, 2**20, device="cuda")  # 16 MiB
    want = x.clone()
    before = torch.cuda.memory_allocated()
    packed = offload.pack(x)
    del x
    offload.pack(torch.randn(2**18, device="cuda"))  # the next pack releases x once its copy is waited for
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before - 16 * 2**20 + 2**20 + 2**20
    torch.testing.assert_close(offload.unpack(packed), want, rtol=0, atol=0)


def test_layers_without_checkpointing_are_refused(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tunesmith.errors import TunesmithError

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(TunesmithError, match="offload_activations.*not checkpointed"):
        offload_layer_inputs(decoder_layers(model), ActivationOffload(FakeOps()))


def test_sft_with_offloading_trains_the_same_losses(tiny_model_dir, sft_data, tmp_path, monkeypatch):
    """Through the run: the layer inputs really move (a CPU stand-in for the device, no size floor), and the
    losses equal checkpointing's alone."""
    import functools

    from tunesmith.model import offload

    fake = FakeOps()
    monkeypatch.setattr(offload, "CudaOps", lambda: fake)
    monkeypatch.setattr(
        offload, "ActivationOffload", functools.partial(offload.ActivationOffload, min_bytes=0)
    )
    keys = {"max_steps": 3, "per_device_train_batch_size": 4, "cutoff_len": 64, "lora_dropout": 0.1}
    train(tiny_model_dir, sft_data, tmp_path / "plain", disable_gradient_checkpointing=False, **keys)
    assert not fake.moved  # the plain run never offloads
    with tunesmith_messages() as messages:
        train(tiny_model_dir, sft_data, tmp_path / "offload", offload_activations=True, **keys)
    assert any("offload_activations: gradient checkpointing on" in m for m in messages)
    assert fake.moved and not any(is_param for _, is_param in fake.moved)
    want, got = logged_losses(tmp_path / "plain"), logged_losses(tmp_path / "offload")
    assert len(got) == 3 and [x for _, x in got] == [x for _, x in want]


def test_offloading_turns_checkpointing_on_and_auto_does_not_probe(tiny_model_dir, sft_data, tmp_path):
    from tunesmith.config import load_config
    from tunesmith.training import checkpoint_plan

    cfg = load_config(None, run_config(tiny_model_dir, sft_data, tmp_path, offload_activations=True))
    assert cfg.model.disable_gradient_checkpointing is False  # on, on a GPU and on CPU
    gpu_run = dict(kind="sft", quantized=False, sharded=False, cuda=True)
    assert not checkpoint_plan.decides(disable=cfg.model.disable_gradient_checkpointing, **gpu_run)
    plain = load_config(None, run_config(tiny_model_dir, sft_data, tmp_path))
    assert plain.model.disable_gradient_checkpointing is None  # auto stays auto without offloading


@pytest.mark.parametrize(
    "extra,needle",
    [
        ({"torch_compile": True}, "offload_activations.*cannot be used with torch_compile"),
        ({"deepspeed": "zero2"}, "offload_activations.*with DeepSpeed"),
        ({"fsdp": "full_shard auto_wrap"}, "offload_activations.*with FSDP"),
        ({"disable_gradient_checkpointing": True}, "disable_gradient_checkpointing.*checkpointing off"),
        ({"gradient_checkpointing": True}, "gradient_checkpointing.*offloading would silently stop"),
    ],
)
def test_offloading_is_refused_with_compile_engines_and_checkpointing_off(
    extra, needle, tiny_model_dir, sft_data, tmp_path
):
    from tunesmith.config import load_config
    from tunesmith.errors import TunesmithError

    with pytest.raises(TunesmithError, match=needle):
        load_config(None, run_config(tiny_model_dir, sft_data, tmp_path, offload_activations=True, **extra))
