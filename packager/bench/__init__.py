"""Benchmark: PyTorch eager, the build's ONNX graphs in ONNX Runtime, and the model served by a live Triton server.

One run, one machine, the same tokenized inputs everywhere (`Workload`: real text, the first row exactly `sequence`
tokens long, so the served tokenizer pads every request to the same shape the in-process runs get):

1. in process: PyTorch eager (the recipe's task wrapper) and ONNX Runtime on every gated level of the build folder,
   measured round-robin (one call each per round, the order rotated every round) so that noise from other processes
   hits all of them alike, in several passes; ratios to PyTorch are taken within each pass and the median over passes
   is reported. ONNX Runtime sessions run with idle-thread spinning off, PyTorch and ONNX Runtime with the same
   thread count;
2. served: the build's Triton models (rendered from the build and published into a temporary repository) on the
   launcher's server, over HTTP and gRPC, through each ensemble (text in) and each model directly (tensors in), with
   closed-loop clients (1, 2, 4, 8 by default; each point bounded in requests and seconds), dynamic batching on (as
   rendered) and off (the models reloaded with Triton's load-time config override), and Triton's own server-side
   breakdown (queue, compute input/infer/output per request) from the deltas of its statistics around each point;
3. the model's FLOPs at each shape (`model_flops`) and this machine's peak (`measure_peaks`), so every configuration
   also reads as achieved GFLOP/s and as a percentage of the peak of its precision.

Writes reports/<model>/bench.json, bench.md and bench.png (p50 latency against throughput), and prints the tables.
All traffic stays on loopback (the launcher binds 127.0.0.1).

    python -m packager bench bert --shapes 1x128,8x128 --served-shapes 1x128 --concurrency 1,2,4,8
"""
