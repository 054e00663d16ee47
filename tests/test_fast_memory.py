"""What a compiled training layer keeps for its backward: inductor's partition of the layer's joint
graph, traced on the CPU (the partition is decided on the graph, not on the device).

fast.py's plan: a layer keeps its input (the fp32 stream), the packed qkv and the attention output
(bf16), and recomputes the rest. A layer given its input as x and pending apart (the previous
layer's residual add left to it) kept both, and its LayerNorm's fp32 normalised input too: 6 more
bytes per stream element and layer, about 1.2 GiB of a 16-clip ViT-B/16 training step.
"""
import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._inductor.decomposition import select_decomp_table

try:
    from torch._inductor.compile_fx import partition_fn as inductor_partition
except ImportError:  # torch 2.6: inductor's partitioner is local to compile_fx; these are its steps there
    def inductor_partition(joint, joint_inputs, **kwargs):
        from torch._functorch.partitioners import min_cut_rematerialization_partition
        from torch._inductor.compile_fx import _recursive_joint_graph_passes

        _recursive_joint_graph_passes(joint)
        return min_cut_rematerialization_partition(joint, joint_inputs, **kwargs, compiler="inductor")

from conftest import CLASSES, tiny_config
from vitaclip import VitaCLIP, fast
from vitaclip.ops import attention

FRAMES = 16  # stream-sized tensors (16 x 50 x 64) well above every weight's size (at most 64 x 256)


def saved_stream_bytes(monkeypatch) -> float:
    """Bytes per stream element of the stream-sized tensors one compiled layer keeps for its backward
    in a training step (bf16 autocast), called as the model calls it."""
    # the op as on CUDA, its launches zero fills: the graph is what CUDA traces, no numbers are checked
    monkeypatch.setattr(attention, "uses_triton", lambda q: True)
    monkeypatch.setattr(attention, "_launch_forward", lambda q, k, v, prompts, frames_per_group: (
        torch.zeros_like(q), torch.zeros(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)))
    saved = []

    def partition(joint, joint_inputs, **kwargs):
        forward, backward = inductor_partition(joint, joint_inputs, **kwargs)
        outputs = next(n for n in forward.graph.nodes if n.op == "output").args[0]
        saved.extend(n.meta["val"] for n in outputs[kwargs["num_fwd_outputs"]:]
                     if isinstance(n.meta.get("val"), torch.Tensor))
        return forward, backward

    def run_eagerly(gm, example_inputs):
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=run_eagerly, bw_compiler=run_eagerly, partition_fn=partition,
                           decompositions=select_decomp_table())
    monkeypatch.setattr(fast, "compiled_layer", lambda: torch.compile(fast._layer, backend=backend, fullgraph=True))
    torch._dynamo.reset()
    block = VitaCLIP(tiny_config(num_frames=2), CLASSES).visual.blocks[0]
    stream = torch.randn(FRAMES, 50, 64, requires_grad=True)  # fp32, as CUDA's ln_pre leaves it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast.fast_compiled_block_forward(block, stream, None, None)  # a training layer's input: the stream alone
    torch._dynamo.reset()
    assert saved, "nothing was partitioned: the layer did not compile with the recording backend"
    return sum(t.numel() * t.element_size() for t in saved if t.numel() >= stream.numel()) / stream.numel()


@pytest.mark.slow
def test_a_compiled_training_layer_keeps_its_input_qkv_and_attention_output_only(monkeypatch):
    # fp32 input 4 + packed qkv 3 x 2 + attention output 2 bytes per stream element
    assert saved_stream_bytes(monkeypatch) == pytest.approx(12, abs=0.5)
