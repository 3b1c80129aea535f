"""What train.py's compiled training step keeps for the backward pass, at the real shapes, without a
GPU: the model is traced on PyTorch's meta device (shapes only, no arithmetic) through the same
decompositions and min-cut partitioner that torch.compile's Inductor uses, with the GPU path's
custom ops (flash attention, the fused MLP and loss) in place. Prints the saved activations by
shape and the backward graph's matmuls and kernel calls. The activations are most of the peak
memory of a CUDA run; weights, optimizer state, transient buffers and allocator slack are not
counted.

    uv run benchmarks/saved_activations.py                 # train.py's defaults, DEVICE_BATCH_SIZE x 2048
    uv run benchmarks/saved_activations.py --batch 128 --budget 0.9

--budget sets torch._functorch.config.activation_memory_budget (1.0 = Inductor's default): below 1
the partitioner recomputes more in the backward to keep less.
"""

import argparse
import collections
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from train_source import ROOT, load_definitions, prepare, train_config  # noqa: E402


def _never_called(*args):
    raise AssertionError("a meta-device trace never runs a kernel")


def saved_activations(config, batch, budget=1.0, train_path=os.path.join(ROOT, "train.py")):
    """Returns ([(name, shape, dtype, bytes)] of the activations the forward graph saves for the
    backward, Counter of the backward graph's ops). bf16 weights stand for autocast's copies."""
    import torch._functorch.config as functorch_config
    from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._inductor.decomposition import select_decomp_table
    from torch.multiprocessing.reductions import StorageWeakRef

    tr = load_definitions(train_path)
    attention = prepare.flash_attention_op("meta_trace", _never_called, _never_called)
    graphs = {}

    def backend(gm, example_inputs):
        def forward_compiler(g, _):
            graphs["saved"] = [n for n in g.graph.nodes if n.op == "output"][0].args[0][1:]  # after the loss
            return make_boxed_func(g)

        def backward_compiler(g, _):
            graphs["backward"] = collections.Counter(str(n.target) for n in g.graph.nodes if n.op == "call_function")
            return make_boxed_func(g)

        return aot_module_simplified(gm, example_inputs, fw_compiler=forward_compiler, bw_compiler=backward_compiler,
                                     decompositions=select_decomp_table(), partition_fn=min_cut_rematerialization_partition)

    torch._dynamo.reset()
    autocast_dtype = tr.autocast_dtype
    tr.autocast_dtype = lambda x: x.dtype  # meta tensors have no autocast state: the weights are bf16 already
    try:
        with torch.device("meta"):
            model = tr.GPT(config, attention).bfloat16()
        idx = torch.zeros(batch, config.sequence_len, dtype=torch.long, device="meta")
        with functorch_config.patch(activation_memory_budget=budget):
            torch.compile(model, backend=backend, dynamic=False)(idx, idx).backward()
    finally:
        tr.autocast_dtype = autocast_dtype
    saved, storages = [], set()
    for node in graphs["saved"]:
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or node.name.startswith("primals"):  # primals: the weights themselves
            continue
        storage = StorageWeakRef(value.untyped_storage())
        if storage not in storages:  # a view of a tensor already counted costs nothing more
            storages.add(storage)
            saved.append((node.name, tuple(value.shape), value.dtype, value.untyped_storage().nbytes()))
    return saved, graphs["backward"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, help="sequences per micro-step (default: train.py's DEVICE_BATCH_SIZE)")
    parser.add_argument("--budget", type=float, default=1.0, help="activation_memory_budget, 0 to 1")
    args = parser.parse_args()
    tr = load_definitions()
    config = train_config(tr, prepare.MAX_SEQ_LEN, prepare.VOCAB_SIZE, fused=("mlp", "loss"))
    batch = args.batch or tr.DEVICE_BATCH_SIZE
    saved, backward = saved_activations(config, batch, args.budget)
    by_shape, count = collections.Counter(), collections.Counter()
    for _, shape, dtype, nbytes in saved:
        by_shape[shape, dtype] += nbytes
        count[shape, dtype] += 1
    print(f"{tr.DEPTH} layers, width {config.n_embd}, {batch} x {config.sequence_len} tokens, activation_memory_budget {args.budget}")
    print(f"saved for the backward: {sum(by_shape.values()) / 2**30:.2f} GiB in {len(saved)} tensors")
    for (shape, dtype), nbytes in by_shape.most_common(10):
        print(f"  {nbytes / 2**30:6.2f} GiB  {count[shape, dtype]:3d} x {shape} {str(dtype).replace('torch.', '')}")
    kernels = {k: v for k, v in backward.items() if "mm" in k or "autoresearch" in k}
    print(f"backward graph: {sum(backward.values())} ops; matmuls and custom ops: {kernels}")


if __name__ == "__main__":
    main()
