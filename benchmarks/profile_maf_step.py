"""Where the time of one default-size MAF train step goes, on one GPU (the evidence behind bench_maf's train-step row).

    python benchmarks/profile_maf_step.py --output_dir runs/profile_maf          # GPU, default size
    python benchmarks/profile_maf_step.py --smoke                               # tiny sizes, any device

Measures, at batch 8, fp32, fused Adam (median of --repeats, CUDA-synchronised):
  - the whole step, and its parts: forward, forward + backward, the gradient masks, Adam;
  - every GEMM of one MADE alone (forward, input gradient, weight gradient of each layer), with the bandwidth it
    reaches over the bytes it must move;
  - the whole step replayed as one CUDA graph (capturable fused Adam), which removes all host work;
  - the whole step with TF32 matmuls allowed;
  - fused Adam over tensors the size of a 16-rectangle cover of the connections that exist (what storing only
    those would save; at the default size the masks keep 50.0 % of each matrix and the cover 53.1 %);
  - a torch.profiler table of the kernels of three steps, by total GPU time.
Writes profile_maf_step.json (and the profiler table as profile_maf_step_kernels.txt) in --output_dir.
"""

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from modeling_maf import MAFConfig, MAFModel


def median_ms(fn, device, repeats, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/profile_maf")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = dict(image_size=8, hidden_sizes=[32, 32], num_blocks=3) if args.smoke else \
        dict(image_size=128, hidden_sizes=[512, 512], num_blocks=7)
    repeats = 3 if args.smoke else args.repeats
    with torch.device(device):
        model = MAFModel(MAFConfig(**sizes))
    model.train()
    batch = torch.rand(8, 3, sizes["image_size"], sizes["image_size"], device=device)
    fused = device.type == "cuda"
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=fused or None)
    results = {"device": torch.cuda.get_device_name() if fused else "cpu", "torch": torch.__version__,
               "parameters": model.num_parameters(), "ms": {}}
    ms = results["ms"]

    def step():
        model(batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def forward_backward():
        model(batch).loss.backward()
        model.zero_grad(set_to_none=True)

    @torch.no_grad()
    def forward():
        model(batch)

    ms["step"] = median_ms(step, device, repeats)
    ms["forward"] = median_ms(forward, device, repeats)
    ms["forward_backward"] = median_ms(forward_backward, device, repeats)
    model(batch).loss.backward()
    ms["adam"] = median_ms(optimizer.step, device, repeats)
    masks = [(layer.weight.grad, layer.mask()) for block in model.blocks for layer in block.made.layers]
    ms["gradient_masks"] = median_ms(lambda: [torch.where(mask, grad, 0.0) for grad, mask in masks], device, repeats)
    optimizer.zero_grad(set_to_none=True)

    # Every GEMM of one MADE alone: (name, fn, bytes it must move at least).
    made = model.blocks[0].made
    first, middle, last = made.layers
    features = made.num_features
    x = torch.randn(8, features, device=device)
    h = torch.randn(8, first.out_features, device=device)
    grad_h = torch.randn(8, first.out_features, device=device)
    grad_out = torch.randn(8, 2 * features, device=device)
    weight_bytes = lambda layer: layer.weight.numel() * 4  # noqa: E731
    gemms = [
        ("layer1 forward x@W1^T", lambda: F.linear(x, first.weight), weight_bytes(first)),
        ("layer1 input grad g@W1", lambda: grad_h @ first.weight, weight_bytes(first)),
        ("layer1 weight grad g^T@x", lambda: grad_h.t() @ x, weight_bytes(first)),
        ("layer3 forward h@W3^T", lambda: F.linear(h, last.weight), weight_bytes(last)),
        ("layer3 input grad g@W3", lambda: grad_out @ last.weight, weight_bytes(last)),
        ("layer3 weight grad g^T@h", lambda: grad_out.t() @ h, weight_bytes(last)),
    ]
    if not args.smoke:  # split-K by hand for the long-K forward: does cuBLAS leave bandwidth on the table?
        chunks = 16
        def split_k():
            return torch.bmm(x.view(8, chunks, -1).transpose(0, 1),
                             first.weight.view(first.out_features, chunks, -1).permute(1, 2, 0)).sum(0)
        gemms.append(("layer1 forward, split-K x16 by hand", split_k, weight_bytes(first)))
    results["gemms"] = []
    for name, fn, nbytes in gemms:
        t = median_ms(fn, device, repeats)
        results["gemms"].append({"gemm": name, "ms": t, "GBps": nbytes / (t / 1e3) / 1e9})

    # What a layout that stores only the existing connections would save: cover each big masked weight with
    # rectangles (the longer side cut into 16 chunks in degree order; a chunk keeps the rows/columns that have any
    # connection in it) and time fused Adam over tensors of exactly those sizes.
    def covered(layer, chunks=16):
        mask = layer.mask()
        long_axis = 1 if mask.shape[1] >= mask.shape[0] else 0
        degrees = layer.in_degrees if long_axis == 1 else layer.out_degrees
        order = torch.argsort(degrees).to(mask.device)
        mask = mask.index_select(long_axis, order)
        if long_axis == 0:
            mask = mask.t()
        short, long = mask.shape
        usable = long - long % chunks
        rows_with_any = mask[:, :usable].reshape(short, chunks, -1).any(-1).sum(0)
        return int(rows_with_any.sum()) * (usable // chunks) + short * (long - usable), int(mask.sum())

    packed_sizes, nonzero, cover = [], 0, 0
    for block in model.blocks:
        for layer in block.made.layers:
            size, existing = covered(layer)
            packed_sizes += [size, layer.bias.numel()]
            nonzero += existing
            cover += size
    packed = [torch.zeros(n, device=device, requires_grad=True) for n in packed_sizes]
    for tensor in packed:
        tensor.grad = torch.randn_like(tensor)
    packed_adam = torch.optim.Adam(packed, lr=1e-4, fused=fused or None)
    results["packed_layout_estimate"] = {
        "weights_dense": sum(layer.weight.numel() for block in model.blocks for layer in block.made.layers),
        "connections_that_exist": nonzero, "weights_in_rectangle_cover_16_chunks": cover,
        "adam_ms_over_the_cover": median_ms(packed_adam.step, device, repeats), "adam_ms_dense": ms["adam"]}
    del packed, packed_adam

    torch.backends.cuda.matmul.allow_tf32 = True
    ms["step_tf32"] = median_ms(step, device, repeats)
    torch.backends.cuda.matmul.allow_tf32 = False

    if device.type == "cuda":
        # Whole step as one CUDA graph: capturable fused Adam, static batch, grads kept allocated.
        graph_optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True, capturable=True)

        def graph_body():
            model(batch).loss.backward()
            graph_optimizer.step()
            graph_optimizer.zero_grad(set_to_none=False)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                graph_body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                graph_body()
            ms["step_cuda_graph"] = median_ms(graph.replay, device, repeats)
        except Exception as error:  # report, do not hide
            results["cuda_graph_error"] = repr(error)
        del graph_optimizer

        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "profile_maf_step_kernels.txt"), "w") as f:
            f.write(table)
        print(table)
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        results["kernels_per_step"] = len(events) / 3

    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "profile_maf_step.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
