"""The cost model's GPU predictions against published measurements (issue 13).

Usage:
    .venv/bin/python benchmarks/published.py            # the table, then the error summary
    .venv/bin/python benchmarks/published.py --json     # every row, prediction and error
    .venv/bin/python benchmarks/published.py --fit      # refit the GPU constants (fit rows)

``ROWS`` below is a table of figures measured and published by others (READMEs, docs
pages, GitHub issue threads), each quoted exactly from its source with the conditions the
source states; where a condition is not stated, the row says so (``ambiguity``). Every
prediction is the planner's cost model through its public code:

- model rows: the preset is built on ``meta`` (``planner.models.load_model``), traced
  (``planner.trace``) at the row's batch and prompt length, priced by
  ``planner.cost_builder.CostBuilder`` for the row's workload (prefill of the prompt, or one
  decode step against a KV cache of ``context`` tokens) in the row's runtime
  (``workload.runtime``: CUDA graphs for gpt-fast/torchao) and solved by
  ``planner.solver.solve`` with tp / pp / dp pinned and one microbatch; the prediction is
  the plan's latency (``Prediction.latency_s``); a ``request`` row (a whole request timed
  end to end) is one prefill plus ``generated - 1`` decode steps priced that way; rows run
  with gpt-fast's custom all-reduce get the same collectives priced by that model
  (``cost_models.nccl.custom_all_reduce_time``) instead of NCCL;
- collective rows: ``cost_models.nccl.choose`` for the all-reduce of the row's message
  size over the row's GPU count (the algorithm the source forced, else NCCL's pick),
  turned into nccl-tests' bus bandwidth (``busbw = 2(n-1)/n * bytes / time``).

Error: ``predicted time / published time - 1`` for every row (a rate such as tokens/s or
GB/s is compared as the time it implies: ``published rate / predicted rate - 1``), so a
positive error means the cost model predicts it slower than measured.

Each row is in the fitting set (``split="fit"``) or the evaluation set (``"eval"``), fixed
here before any fitting. The GPU constants fitted (``roofline.GPU_HBM_EFFICIENCY``,
``roofline.GPU_KERNEL_S``, ``nccl.CUSTOM_AR_LATENCY_S``, ``nccl.CUSTOM_AR_LATENCY_PER_PEER_S``
by ``--fit``; ``nccl.RING_LINK_EFFICIENCY`` from the two NCCL ring fit rows) use fit rows
only. ``not_modelled`` lists, per row, what the planner does not model (TensorRT-LLM
engines and their all-reduce plugin, FP8); such a row still gets a prediction (the nearest
thing the planner models, said in the reason) and its error is shown, but the summary
reports modelled rows apart: the target is the evaluation rows whose runtime is modelled.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

__all__ = ["Row", "ROWS", "SOURCES", "MODEL_SHAPES", "not_modelled", "predict_rows", "main"]

# --------------------------------------------------------------------------- what the planner models
# The runtimes the cost model prices (cost_models.runtime), the collectives it models
# (cost_models.nccl: NCCL's algorithms and protocols, the custom intra-node all-reduce),
# its dtypes. A row whose conditions fall outside them is "not modelled".
_CG = "cuda graphs (torch.compile reduce-overhead)"
_CUSTOM_AR = "intra-node custom all-reduce (ENABLE_INTRA_NODE_COMM=1)"
RUNTIME_OF = {"eager": "eager", "torch.compile": "compiled", _CG: "cudagraphs"}
COLLECTIVE_ALGOS = {"nccl ring": ("ring",), "nccl nvls": ("nvls",), "nccl default (nvls)": None}
MODELLED_COMMS = ("", _CUSTOM_AR, "nccl")
MODELLED_DTYPES = ("float32", "bfloat16", "float16")

# Shapes of the presets used, as the sources' models have them (checked against
# planner.models.presets at run time, so a drifting preset fails loudly).
MODEL_SHAPES = {
    "llama-2-7b": dict(layers=32, hidden=4096, ffn=11008, heads=32, kv_heads=32, vocab=32000),
    "llama-2-70b": dict(layers=80, hidden=8192, ffn=28672, heads=64, kv_heads=8, vocab=32000),
    "llama-3-8b": dict(layers=32, hidden=4096, ffn=14336, heads=32, kv_heads=8, vocab=128256),
}

SOURCES = {
    "gpt-fast": (
        "pytorch-labs/gpt-fast README.md, section 'Benchmarks' / 'Tensor Parallelism' "
        "(https://github.com/pytorch-labs/gpt-fast/blob/main/README.md; the revision with the "
        "Llama-3-8B rows). Conditions quoted from it: \"Benchmarks run on an 8xA100-80GB, power "
        "limited to 330W with a hybrid cube mesh topology. Note that all benchmarks are run at "
        "*batch size=1* ... they are run with a very small prompt length (just 5 tokens).\" TP "
        "command: \"ENABLE_INTRA_NODE_COMM=1 torchrun --standalone --nproc_per_node=2 "
        "generate.py --compile\". generate.py: decode_one_token = torch.compile(..., "
        "mode=\"reduce-overhead\") (CUDA graphs), --max_new_tokens default 200, tokens/sec = "
        "tokens generated / wall time of generate() (prefill of the 5-token prompt included), "
        "bfloat16."),
    "torchao": (
        "pytorch/ao torchao/quantization/README.md, section 'Benchmarks', tables 'CUDA backend "
        "| NVIDIA-A100-80GB GPU' and 'CUDA backend | NVIDIA-H100 GPU', row 'Base (bfloat16)', "
        "column 'Tokens/Second' (https://github.com/pytorch/ao/blob/main/torchao/quantization/"
        "README.md). Gathered with torchao/_models/llama/generate.py (a gpt-fast derivative); "
        "the README says \"Llama with batchsize=1\"; prompt, generation length and compile mode "
        "are not stated in the table (its benchmarks.sh runs generate.py --compile)."),
    "trtllm-v0.6.1": (
        "NVIDIA/TensorRT-LLM docs/source/performance.md, v0.6.1 revision, section 'Low "
        "Latency' (\"The following data is from TensorRT-LLM v0.5\"; \"reference data at batch "
        "size 1 for first token latency\"), tables 'A100 GPUs (FP16)', 'H100 GPUs (FP8)', "
        "'L40S GPUs (FP8)', column '1st Token Latency (ms)'. Engines built with "
        "--enable_context_fmha --remove_input_padding --use_gpt_attention_plugin (Llama2-7b: "
        "--tp_size 1; Llama2-70b: --tp_size 4, --n_kv_head 8, --vocab_size 32000); the A100 "
        "variant removes --enable_fp8 --fp8_kv_cache. 'LLaMA 7B' / 'LLaMA 70B' are the "
        "Llama2-7b / Llama2-70b of its methodology section."),
    "nemo-llama2": (
        "NVIDIA NeMo Framework user guide, 'Llama-2 Results' / 'Inference Performance' "
        "(https://docs.nvidia.com/nemo-framework/user-guide/latest/performance/llama.html): "
        "\"Inference performance was measured for - (1- 8 × A100 80GB SXM4) - (1- 8 × H100 80GB "
        "HBM3)\"; \"Configuration 1: Chatbot Conversation use case\", \"batch size: 1 - 8\", "
        "\"input tokens length: 128\", \"output tokens length: 20\"; table 'Average Latency, "
        "Average Throughput, and Model Size', columns Model size | Batch Size | Average Latency "
        "[ms] (A100 80GB SXM4, H100 80GB HBM3) | Average Throughput [sentences/s] (A100, H100) "
        "| TP | PP | GPUs. The NeMo inference path is TensorRT-LLM (NeMo performance summary "
        "page: \"For inference, the NeMo Framework provides a path that leverages "
        "TensorRT-LLM\"); precision not shown in the part of the page read."),
    "nccl#1455": (
        "NVIDIA/nccl issue 1455 (https://github.com/NVIDIA/nccl/issues/1455), description: "
        "\"8 * H100_SXM, ngctorch enviornment\"; \"NCCL_ALGO=[ALGO] ./all_reduce_perf -b 2G -e "
        "4G -f 2 -g [gpus]\"; \"when using ALGO=RING, busbw is about 365-370 GBps when gpus "
        "from 2 to 8\"; \"when using ALGO=NVLS ... Busbw increase from 370 to 420, 440, 460, "
        "and 480 GBps when gpus increase from 4 to 5, 6, 7, and 8\"."),
    "nccl-tests#149": (
        "NVIDIA/nccl-tests issue 149 (https://github.com/NVIDIA/nccl-tests/issues/149), "
        "description: \"HPE Apollo 6500 machine with 8xA100 80GB GPUs connected together with "
        "NVLink\"; \"the nccl tests show a busbw of ~200 GB/s\"; command \"./build/"
        "all_reduce_perf -b 8 -e 1G -f 4 -g 1 -t 8\"; NCCL 2.18.1 (container) / 2.17.1 (host)."),
    "nccl-tests#272": (
        "NVIDIA/nccl-tests issue 272 (https://github.com/NVIDIA/nccl-tests/issues/272), "
        "title \"[H200] NCCL's All-reduce Performance Exceed 4th Gen NVLINK Spec.\": "
        "\"all_reduce_perf was performed on a server with 8x H200 connected via NVLINK4\", "
        "\"-b 64k -e 4G -f 2 -g 1\", \"NCCL version 2.20.3+cuda12.3\", \"The output shows peak "
        "bandwidth of 475 GB/s\" (default NCCL_ALGO)."),
}


@dataclass(frozen=True)
class Row:
    """One published measurement, fully specified.

    Attributes:
        id: short unique name.
        kind: ``"model"`` (a whole-model step) or ``"collective"``.
        model: planner preset (shape in ``MODEL_SHAPES``); ``""`` for collectives.
        source_model: the model as the source names it.
        gpu: catalogue device the prediction uses (``cost_models.devices``).
        gpu_as_published: the GPU as the source describes it.
        gpus: GPUs in the measured machine (node).
        interconnect: as the source describes it.
        tp, pp, dp: parallelism of the measurement (collectives: tp = ranks in the group).
        batch: sequences per step.
        phase: ``prefill``, ``decode``, ``request`` (one prefill then ``generated - 1``
            decode steps, timed end to end) or ``all_reduce``.
        tokens: prompt length (prefill: tokens priced; decode: prompt before generation).
        generated: tokens generated per sequence (decode rows), 0 otherwise.
        context: KV-cache length the decode prediction uses (prompt + generated / 2, the mean
            over the generation), 0 otherwise.
        nbytes: message size of a collective row (the largest size of the run), 0 otherwise.
        dtype: of weights and activations as measured.
        runtime: ``eager``, ``cuda graphs (torch.compile reduce-overhead)``, ``TensorRT-LLM``,
            ``nccl ring``, ``nccl nvls``, ...; ``comm`` the all-reduce used by the model rows.
        comm: all-reduce implementation of a model row (``""`` at tp 1).
        published: the figure, in ``unit``.
        unit: ``tokens/s``, ``ms`` or ``GB/s busbw``.
        quote: the source's exact text or table cells for this figure.
        source: key of ``SOURCES``.
        split: ``fit`` or ``eval``.
        ambiguity: what the source leaves open and what this file assumed.
    """

    id: str
    kind: str
    model: str
    source_model: str
    gpu: str
    gpu_as_published: str
    gpus: int
    interconnect: str
    tp: int
    pp: int
    dp: int
    batch: int
    phase: str
    tokens: int
    generated: int
    context: int
    nbytes: int
    dtype: str
    runtime: str
    comm: str
    published: float
    unit: str
    quote: str
    source: str
    split: str
    ambiguity: str = ""


_A100_GPT_FAST = "A100-SXM 80GB, power limited to 330 W"
_CUBE_MESH = "NVLink, hybrid cube mesh (not NVSwitch)"


def _gpt_fast(id_, model, source_model, tp, tok_s, split, bw):
    return Row(
        id=id_, kind="model", model=model, source_model=source_model, gpu="A100-80GB",
        gpu_as_published=_A100_GPT_FAST, gpus=8, interconnect=_CUBE_MESH, tp=tp, pp=1, dp=1,
        batch=1, phase="decode", tokens=5, generated=200, context=5 + 200 // 2, nbytes=0,
        dtype="bfloat16", runtime=_CG, comm=_CUSTOM_AR if tp > 1 else "",
        published=tok_s, unit="tokens/s",
        quote=f"Tensor Parallelism table: | {source_model} | {tp} | {tok_s} | {bw} |",
        source="gpt-fast", split=split,
        ambiguity="generation length not stated in the README: generate.py's default "
                  "--max_new_tokens 200 assumed; tokens/s includes the 5-token prefill",
    )


def _trt(id_, model, source_model, gpu, published_gpu, tp, tokens, ms, dtype, table, split,
         extra=""):
    return Row(
        id=id_, kind="model", model=model, source_model=source_model, gpu=gpu,
        gpu_as_published=published_gpu, gpus=max(tp, 1), interconnect="not stated", tp=tp,
        pp=1, dp=1, batch=1, phase="prefill", tokens=tokens, generated=0, context=0, nbytes=0,
        dtype=dtype, runtime="TensorRT-LLM v0.5 engine (context FMHA, GPT attention plugin)",
        comm="TensorRT-LLM all-reduce plugin" if tp > 1 else "",
        published=float(ms), unit="ms",
        quote=f"{table}: | {source_model} | 1 | {tp} | {tokens} | {ms} |",
        source="trtllm-v0.6.1", split=split,
        ambiguity=("A100 memory size (40/80 GB) and interconnect not stated: A100-80GB "
                   "assumed" if gpu == "A100-80GB" else "interconnect not stated") + extra,
    )


def _nccl(id_, gpu, published_gpu, interconnect, n, busbw, runtime, quote, source, split,
          nbytes, ambiguity=""):
    return Row(
        id=id_, kind="collective", model="", source_model="", gpu=gpu,
        gpu_as_published=published_gpu, gpus=8, interconnect=interconnect, tp=n, pp=1, dp=1,
        batch=1, phase="all_reduce", tokens=0, generated=0, context=0, nbytes=nbytes,
        dtype="float32", runtime=runtime, comm=runtime, published=float(busbw),
        unit="GB/s busbw", quote=quote, source=source, split=split, ambiguity=ambiguity,
    )


def _nemo(id_, gpu, published_gpu, tp, ms, cells, split):
    return Row(
        id=id_, kind="model", model="llama-2-7b", source_model="Llama-2-7B", gpu=gpu,
        gpu_as_published=published_gpu, gpus=8, interconnect="not stated (DGX-class, NVSwitch "
        "assumed)", tp=tp, pp=1, dp=1, batch=1, phase="request", tokens=128, generated=20,
        context=128 + 10, nbytes=0, dtype="bfloat16", runtime="TensorRT-LLM (NeMo inference)",
        comm="TensorRT-LLM all-reduce plugin" if tp > 1 else "", published=float(ms),
        unit="ms", quote=f"| Llama-2-7B | 1 | {cells} | {tp} | 1 | {tp} |",
        source="nemo-llama2", split=split,
        ambiguity="precision not shown (16-bit assumed, priced in bfloat16); request latency "
                  "priced as one 128-token prefill + 19 decode steps at context 138 (whether "
                  "the 20 output tokens include the prefill's token is not stated)",
    )


_RING_1455 = ("\"when using ALGO=RING, busbw is about 365-370 GBps when gpus from 2 to 8\" "
              "(367.5 = midpoint of the quoted range)")
_GIB = 1 << 30

ROWS: tuple[Row, ...] = (
    # gpt-fast, 8xA100-80GB (330 W, cube mesh), batch 1, bf16, CUDA graphs, custom all-reduce
    _gpt_fast("gf-l2-7b-tp1", "llama-2-7b", "Llama-2-7B", 1, 104.9, "fit", "1397.31"),
    _gpt_fast("gf-l2-7b-tp2", "llama-2-7b", "Llama-2-7B", 2, 168.84, "fit", "1181.99"),
    _gpt_fast("gf-l2-7b-tp4", "llama-2-7b", "Llama-2-7B", 4, 254.02, "fit", "955.83"),
    _gpt_fast("gf-l2-7b-tp8", "llama-2-7b", "Llama-2-7B", 8, 328.43, "fit", "704.10"),
    _gpt_fast("gf-l2-70b-tp2", "llama-2-70b", "Llama-2-70B", 2, 21.32, "fit", "1481.87"),
    _gpt_fast("gf-l2-70b-tp4", "llama-2-70b", "Llama-2-70B", 4, 38.01, "eval", "1340.76"),
    _gpt_fast("gf-l2-70b-tp8", "llama-2-70b", "Llama-2-70B", 8, 62.50, "fit", "1135.29"),
    _gpt_fast("gf-l3-8b-tp1", "llama-3-8b", "Llama-3-8B", 1, 94.19, "eval", "1411.76"),
    _gpt_fast("gf-l3-8b-tp2", "llama-3-8b", "Llama-3-8B", 2, 150.48, "eval", "1208.80"),
    _gpt_fast("gf-l3-8b-tp4", "llama-3-8b", "Llama-3-8B", 4, 219.77, "eval", "991.63"),
    _gpt_fast("gf-l3-8b-tp8", "llama-3-8b", "Llama-3-8B", 8, 274.65, "eval", "768.55"),
    # torchao quantization README, single GPU, batch 1, bf16 ("Base (bfloat16)")
    Row(id="ao-l2-7b-a100", kind="model", model="llama-2-7b", source_model="Llama-2-7B",
        gpu="A100-80GB", gpu_as_published="NVIDIA-A100-80GB", gpus=1,
        interconnect="single GPU", tp=1, pp=1, dp=1, batch=1, phase="decode", tokens=5,
        generated=200, context=105, nbytes=0, dtype="bfloat16", runtime=_CG, comm="",
        published=107.38, unit="tokens/s",
        quote="CUDA backend | NVIDIA-A100-80GB GPU: | Llama-2-7B | Base (bfloat16) | 12.212 "
              "| 107.38 | 1418.93 | 13.88 | 13.21 |",
        source="torchao", split="fit",
        ambiguity="prompt/generation length and compile mode not stated in the table: "
                  "gpt-fast's (5-token prompt, 200 new tokens, reduce-overhead) assumed"),
    Row(id="ao-l3-8b-a100", kind="model", model="llama-3-8b", source_model="Llama-3-8B",
        gpu="A100-80GB", gpu_as_published="NVIDIA-A100-80GB", gpus=1,
        interconnect="single GPU", tp=1, pp=1, dp=1, batch=1, phase="decode", tokens=5,
        generated=200, context=105, nbytes=0, dtype="bfloat16", runtime=_CG, comm="",
        published=95.64, unit="tokens/s",
        quote="CUDA backend | NVIDIA-A100-80GB GPU: | Llama-3-8B | Base (bfloat16) | 7.441 "
              "| 95.64 | 1435.54 | 16.43 | 15.01 |",
        source="torchao", split="eval",
        ambiguity="prompt/generation length and compile mode not stated in the table: "
                  "gpt-fast's (5-token prompt, 200 new tokens, reduce-overhead) assumed"),
    Row(id="ao-l31-8b-h100", kind="model", model="llama-3-8b", source_model="Llama-3.1-8B",
        gpu="H100-SXM-80GB", gpu_as_published="NVIDIA-H100 (SXM/PCIe not stated)", gpus=1,
        interconnect="single GPU", tp=1, pp=1, dp=1, batch=1, phase="decode", tokens=5,
        generated=200, context=105, nbytes=0, dtype="bfloat16", runtime=_CG, comm="",
        published=126.90, unit="tokens/s",
        quote="CUDA backend | NVIDIA-H100 GPU: | Llama-3.1-8B | Base (bfloat16) | 7.54 "
              "| 126.90 | 1904.75 | 16.75 | 15.01 |",
        source="torchao", split="eval",
        ambiguity="H100 variant not stated: SXM assumed (the 1904.75 GB/s achieved would be "
                  "95% of the PCIe card's 2.0 TB/s, 57% of the SXM's 3.35 TB/s); Llama-3.1-8B "
                  "has llama-3-8b's shape (RoPE scaling differs); prompt/generation length and "
                  "compile mode not stated: gpt-fast's assumed"),
    # TensorRT-LLM v0.6.1 docs, "Low Latency" (v0.5 data): batch 1, first-token latency (prefill)
    _trt("trt-l2-7b-128-a100", "llama-2-7b", "LLaMA 7B", "A100-80GB", "A100", 1, 128, 16,
         "float16", "A100 GPUs (FP16)", "fit"),
    _trt("trt-l2-7b-2048-a100", "llama-2-7b", "LLaMA 7B", "A100-80GB", "A100", 1, 2048, 133,
         "float16", "A100 GPUs (FP16)", "fit"),
    _trt("trt-l2-70b-128-a100", "llama-2-70b", "LLaMA 70B", "A100-80GB", "A100", 4, 128, 47,
         "float16", "A100 GPUs (FP16)", "eval"),
    _trt("trt-l2-70b-2048-a100", "llama-2-70b", "LLaMA 70B", "A100-80GB", "A100", 4, 2048, 377,
         "float16", "A100 GPUs (FP16)", "eval"),
    _trt("trt-l2-7b-128-h100", "llama-2-7b", "LLaMA 7B", "H100-SXM-80GB", "H100", 1, 128, 7,
         "fp8", "H100 GPUs (FP8)", "eval", "; H100 variant not stated (SXM assumed)"),
    _trt("trt-l2-7b-2048-h100", "llama-2-7b", "LLaMA 7B", "H100-SXM-80GB", "H100", 1, 2048, 36,
         "fp8", "H100 GPUs (FP8)", "eval", "; H100 variant not stated (SXM assumed)"),
    _trt("trt-l2-70b-128-h100", "llama-2-70b", "LLaMA 70B", "H100-SXM-80GB", "H100", 4, 128, 26,
         "fp8", "H100 GPUs (FP8)", "eval", "; H100 variant not stated (SXM assumed)"),
    _trt("trt-l2-70b-2048-h100", "llama-2-70b", "LLaMA 70B", "H100-SXM-80GB", "H100", 4, 2048,
         109, "fp8", "H100 GPUs (FP8)", "eval", "; H100 variant not stated (SXM assumed)"),
    _trt("trt-l2-7b-128-l40s", "llama-2-7b", "LLaMA 7B", "L40S", "L40S", 1, 128, 14,
         "fp8", "L40S GPUs (FP8)", "eval"),
    _trt("trt-l2-7b-2048-l40s", "llama-2-7b", "LLaMA 7B", "L40S", "L40S", 1, 2048, 73,
         "fp8", "L40S GPUs (FP8)", "eval"),
    # NeMo Framework Llama-2 inference (TensorRT-LLM), batch 1, 128 in / 20 out, request latency
    _nemo("nemo-l2-7b-tp1-a100", "A100-80GB", "A100 80GB SXM4", 1, 234.0,
          "234.0 | 153.8 | 4.3 | 6.5", "fit"),
    _nemo("nemo-l2-7b-tp2-a100", "A100-80GB", "A100 80GB SXM4", 2, 171.7,
          "171.7 | 128.6 | 5.8 | 7.8", "fit"),
    _nemo("nemo-l2-7b-tp4-a100", "A100-80GB", "A100 80GB SXM4", 4, 143.7,
          "143.7 | 107.4 | 7.0 | 9.3", "fit"),
    _nemo("nemo-l2-7b-tp8-a100", "A100-80GB", "A100 80GB SXM4", 8, 136.5,
          "136.5 | 97.6 | 7.3 | 10.2", "fit"),
    _nemo("nemo-l2-7b-tp1-h100", "H100-SXM-80GB", "H100 80GB HBM3", 1, 153.8,
          "234.0 | 153.8 | 4.3 | 6.5", "eval"),
    _nemo("nemo-l2-7b-tp2-h100", "H100-SXM-80GB", "H100 80GB HBM3", 2, 128.6,
          "171.7 | 128.6 | 5.8 | 7.8", "eval"),
    _nemo("nemo-l2-7b-tp4-h100", "H100-SXM-80GB", "H100 80GB HBM3", 4, 107.4,
          "143.7 | 107.4 | 7.0 | 9.3", "eval"),
    _nemo("nemo-l2-7b-tp8-h100", "H100-SXM-80GB", "H100 80GB HBM3", 8, 97.6,
          "136.5 | 97.6 | 7.3 | 10.2", "eval"),
    # NCCL all-reduce bus bandwidth, large messages, one node
    _nccl("nccl-h100-ring-2", "H100-SXM-80GB", "H100 SXM", "NVLink 4 (NVSwitch)", 2, 367.5,
          "nccl ring", _RING_1455, "nccl#1455", "fit", 4 * _GIB,
          "a range (365-370) for 2..8 GPUs; message 2-4 GiB (-b 2G -e 4G): 4 GiB priced"),
    _nccl("nccl-h100-ring-4", "H100-SXM-80GB", "H100 SXM", "NVLink 4 (NVSwitch)", 4, 367.5,
          "nccl ring", _RING_1455, "nccl#1455", "eval", 4 * _GIB,
          "a range (365-370) for 2..8 GPUs; message 2-4 GiB (-b 2G -e 4G): 4 GiB priced"),
    _nccl("nccl-h100-ring-8", "H100-SXM-80GB", "H100 SXM", "NVLink 4 (NVSwitch)", 8, 367.5,
          "nccl ring", _RING_1455, "nccl#1455", "fit", 4 * _GIB,
          "a range (365-370) for 2..8 GPUs; message 2-4 GiB (-b 2G -e 4G): 4 GiB priced"),
    _nccl("nccl-h100-nvls-8", "H100-SXM-80GB", "H100 SXM", "NVLink 4 (NVSwitch)", 8, 480,
          "nccl nvls", "\"Busbw increase from 370 to 420, 440, 460, and 480 GBps when gpus "
          "increase from 4 to 5, 6, 7, and 8\" (ALGO=NVLS, 8 GPUs)", "nccl#1455", "eval",
          4 * _GIB, "message 2-4 GiB (-b 2G -e 4G): 4 GiB priced"),
    _nccl("nccl-a100-8", "A100-80GB", "A100 80GB (HPE Apollo 6500)", "NVLink", 8, 200,
          "nccl ring", "\"the nccl tests show a busbw of ~200 GB/s\"", "nccl-tests#149", "eval",
          _GIB, "\"~200\": approximate; algorithm not stated (NCCL's default; A100 has no "
          "NVLS, ring assumed); largest size 1 GiB (-e 1G) priced"),
    _nccl("nccl-h200-8", "H200", "H200", "NVLINK4", 8, 475, "nccl default (nvls)",
          "\"The output shows peak bandwidth of 475 GB/s\"", "nccl-tests#272", "eval", 4 * _GIB,
          "algorithm not stated: NCCL 2.20's default on 8 NVSwitch GPUs is NVLS (the title "
          "says it exceeds the NVLink spec, which a ring cannot); largest size 4 GiB priced"),
)


def not_modelled(row: Row) -> list[str]:
    """What the planner does not model about ``row`` (empty: fully modelled)."""
    reasons = []
    if row.kind == "collective":
        if row.runtime not in COLLECTIVE_ALGOS:
            reasons.append(f"{row.runtime}: not an NCCL algorithm the model has")
        return reasons
    if row.runtime not in RUNTIME_OF:
        reasons.append(f"{row.runtime}: an engine's own fused kernels and plugins, not a "
                       "PyTorch runtime; predicted as compiled (prefill) and cudagraphs "
                       "(decode)")
    if row.comm not in MODELLED_COMMS:
        reasons.append(f"{row.comm}: not modelled; predicted with NCCL")
    if row.dtype not in MODELLED_DTYPES:
        reasons.append(f"{row.dtype}: not a planner dtype; predicted in bfloat16")
    return reasons


# --------------------------------------------------------------------------- predictions


def _check_shapes() -> None:
    from planner.models.presets import PRESETS

    keys = dict(layers="num_hidden_layers", hidden="hidden_size", ffn="intermediate_size",
                heads="num_attention_heads", kv_heads="num_key_value_heads", vocab="vocab_size")
    for name, shape in MODEL_SHAPES.items():
        config = PRESETS[name].config
        for k, v in shape.items():
            if config[keys[k]] != v:
                raise SystemExit(f"preset {name}: {keys[k]} is {config[keys[k]]}, the "
                                 f"published model has {v}; update MODEL_SHAPES or the row")


def _runtime(row: Row, phase: str) -> str:
    """The runtime the row is priced in: its own, or the nearest modelled one."""
    if row.runtime in RUNTIME_OF:
        return RUNTIME_OF[row.runtime]
    return "cudagraphs" if phase == "decode" else "compiled"


def _workload(row: Row, phase: str):
    from planner.cluster import Workload

    dtype = row.dtype if row.dtype in MODELLED_DTYPES else "bfloat16"
    runtime = _runtime(row, phase)
    if phase == "decode":
        return Workload(batch_size=row.batch, seq_len=row.tokens, dtype=dtype, phase="decode",
                        context_len=row.context, runtime=runtime)
    return Workload(batch_size=row.batch, seq_len=row.tokens, dtype=dtype, phase="prefill",
                    runtime=runtime)


def _predict_model(row: Row, traces: dict) -> dict:
    """One step (prefill or decode) of ``row``; a ``request`` row is one prefill of the
    prompt plus ``generated - 1`` decode steps at the mean context."""
    if row.phase != "request":
        return _predict_step(row, row.phase, traces)
    prefill = _predict_step(row, "prefill", traces)
    decode = _predict_step(row, "decode", traces)
    if prefill["predicted_s"] is None or decode["predicted_s"] is None:
        return {"predicted_s": None, "error": prefill.get("error") or decode.get("error")}
    steps = row.generated - 1
    return {
        "predicted_s": prefill["predicted_s"] + steps * decode["predicted_s"],
        "prefill_s": prefill["predicted_s"], "decode_step_s": decode["predicted_s"],
        "compute_s": prefill["compute_s"] + steps * decode["compute_s"],
        "comm_s": prefill["comm_s"] + steps * decode["comm_s"],
        "peak_memory_gib": max(prefill["peak_memory_gib"], decode["peak_memory_gib"]),
    }


def _predict_step(row: Row, phase: str, traces: dict) -> dict:
    from planner.cluster import Cluster
    from planner.cost_builder import CostBuilder
    from planner.models.loader import load_model
    from planner.solver import PlanError, solve
    from planner.tracing import trace

    w = _workload(row, phase)
    key = (row.model, row.batch, row.tokens, w.dtype, row.context if phase == "decode" else 0)
    if key not in traces:
        lm = load_model(row.model, batch_size=row.batch, seq_len=row.tokens,
                        dtype=w.torch_dtype, device="meta",
                        context_len=row.context if phase == "decode" else None)
        traces[key] = trace(lm.model, lm.args, lm.kwargs, name=lm.name, arch=lm.arch)
    traced = traces[key]
    cluster = Cluster.parse(f"{row.gpus}x{row.gpu}")
    builder = CostBuilder(traced, cluster, w)
    try:
        sol = solve(builder, cluster, w, pins={"tp": row.tp, "pp": row.pp, "dp": row.dp,
                                               "microbatches": 1},
                    num_workers=1, time_limit_s=30.0, diagnose=False)
    except PlanError as e:  # InfeasiblePlanError included
        return {"predicted_s": None, "error": str(e).split(";")[0]}
    comm = sum(s.comm_s for s in sol.stages)
    out = {
        "predicted_s": sol.predicted.latency_s,
        "compute_s": sum(s.compute_s for s in sol.stages),
        "comm_s": comm,
        "peak_memory_gib": sol.predicted.peak_memory_bytes / 2**30,
        "all_reduces": 0,
    }
    if row.comm == _CUSTOM_AR and row.tp > 1:
        # The planner prices its own runtime's NCCL calls; gpt-fast's all-reduces are its
        # one-shot/two-shot kernel instead: the same collectives, priced by that model.
        custom, calls = _custom_comm(builder, row.tp, w, cluster)
        out.update(predicted_s=sol.predicted.latency_s - comm + custom, comm_s=custom,
                   all_reduces=calls)
    return out


def _custom_comm(builder, tp: int, w, cluster) -> tuple[float, int]:
    """Seconds of every layer's collectives at ``tp`` with all-reduces priced as the
    custom intra-node all-reduce (others by NCCL), and the number of all-reduces."""
    from cost_models.layer_cost import collectives_at, comm_time
    from cost_models.nccl import custom_all_reduce_time

    spec = cluster.device_spec
    total, calls = 0.0, 0
    for j in range(len(builder.traced.layers)):
        for kind, nbytes in collectives_at(builder.sharded_at(j, tp), w, 1, builder.traced_shape):
            if kind == "all_reduce":
                total += custom_all_reduce_time(nbytes, tp, spec)
                calls += 1
            else:
                total += comm_time(kind, nbytes, tp, spec)
    return total, calls


def _predict_collective(row: Row) -> dict:
    from cost_models.collectives import bus_factor
    from cost_models.devices import lookup
    from cost_models.nccl import ALGORITHMS, choose

    spec = lookup(row.gpu)
    algos = COLLECTIVE_ALGOS.get(row.runtime) or ALGORITHMS
    pick = choose("all_reduce", row.nbytes, row.tp, spec, algorithms=algos)
    return {"predicted_s": pick.seconds, "algorithm": f"{pick.algorithm}/{pick.protocol}",
            "predicted_busbw_gbs": bus_factor("all_reduce", row.tp) * row.nbytes
            / pick.seconds / 1e9}


def _published_seconds(row: Row) -> float:
    """The published figure as the time of one step (model) or one call (collective)."""
    if row.unit == "tokens/s":
        return row.batch / row.published
    if row.unit == "ms":
        return row.published / 1e3
    if row.unit == "GB/s busbw":
        from cost_models.collectives import bus_factor

        return bus_factor("all_reduce", row.tp) * row.nbytes / (row.published * 1e9)
    raise ValueError(f"unknown unit {row.unit!r}")


def _in_unit(row: Row, seconds: float) -> float:
    if row.unit == "tokens/s":
        return row.batch / seconds
    if row.unit == "ms":
        return seconds * 1e3
    from cost_models.collectives import bus_factor

    return bus_factor("all_reduce", row.tp) * row.nbytes / seconds / 1e9


def predict_rows(rows=ROWS) -> list[dict]:
    """Every row with the planner's prediction and the error (``None`` when infeasible)."""
    _check_shapes()
    traces: dict = {}
    out = []
    for row in rows:
        pred = _predict_collective(row) if row.kind == "collective" else _predict_model(row, traces)
        published_s = _published_seconds(row)
        p = pred.get("predicted_s")
        out.append({
            **asdict(row),
            **pred,
            "published_s": published_s,
            "predicted": _in_unit(row, p) if p else None,
            "error": (p / published_s - 1.0) if p else None,
            "not_modelled": not_modelled(row),
        })
    return out


# --------------------------------------------------------------------------- fitting

# The decode rows the GPU constants are fitted to: the fit set's rows whose runtime and
# collectives the cost model models (never an evaluation row).
FIT_KINDS = ("decode",)


def fit_rows(rows=ROWS) -> list[Row]:
    return [r for r in rows if r.split == "fit" and r.kind == "model" and r.phase in FIT_KINDS
            and not not_modelled(r)]


def _with_constants(hbm: float, kernel_s: float, ar: float, ar_peer: float):
    """Set the fitted constants for the following predictions (fitting only)."""
    import cost_models.nccl as nccl
    import cost_models.roofline as roofline

    roofline.GPU_HBM_EFFICIENCY, roofline.GPU_KERNEL_S = hbm, kernel_s
    nccl.CUSTOM_AR_LATENCY_S, nccl.CUSTOM_AR_LATENCY_PER_PEER_S = ar, ar_peer


def fit() -> int:
    """Least squares in relative error of the decode fit rows' step times over
    (GPU_KERNEL_S, 1 / GPU_HBM_EFFICIENCY, CUSTOM_AR_LATENCY_S, CUSTOM_AR_LATENCY_PER_PEER_S).

    A batch-1 decode step is memory-bound and its time is linear in these four: kernels ·
    kernel_s + bytes / (bandwidth · e) + all-reduces · (a + b (n - 1)) + the rest. The
    coefficients of each row are read off the cost model itself at three settings of the
    constants (exact for a linear function), then the 4-parameter fit is solved.
    """
    import numpy as np

    rows = fit_rows()
    traces: dict = {}

    def step(hbm, kernel_s, ar=0.0, ar_peer=0.0):
        _with_constants(hbm, kernel_s, ar, ar_peer)
        return [_predict_step(r, "decode", traces) for r in rows]

    base = step(1.0, 0.0)
    with_k = step(1.0, 1e-6)
    half = step(0.5, 0.0)
    a, y = [], []
    for r, p0, pk, ph in zip(rows, base, with_k, half):
        kernels = (pk["predicted_s"] - p0["predicted_s"]) / 1e-6
        mem = ph["predicted_s"] - p0["predicted_s"]  # bytes / bandwidth at e = 1
        rest = p0["predicted_s"] - mem
        n_ar = p0["all_reduces"]
        target = _published_seconds(r)  # a decode row: one step (tokens/s: 1 / rate)
        a.append([kernels / target, mem / target, n_ar / target, n_ar * (r.tp - 1) / target])
        y.append(1.0 - rest / target)
        print(f"{r.id:<16} kernels {kernels:7.0f}  bytes/bw {1e3 * mem:7.3f} ms  "
              f"all-reduces {n_ar:4d}  rest {1e3 * rest:6.3f} ms  published "
              f"{1e3 * target:7.3f} ms")
    a, y = np.array(a), np.array(y)
    theta = _nnls(a, y)
    kernel_s, inv_e, ar, ar_peer = theta
    hbm = 1.0 / inv_e
    print(f"\nfitted on {len(rows)} rows ({', '.join(r.id for r in rows)}):")
    print(f"  GPU_HBM_EFFICIENCY           {hbm:.3f}")
    print(f"  GPU_KERNEL_S                 {kernel_s * 1e6:.2f} us")
    print(f"  CUSTOM_AR_LATENCY_S          {ar * 1e6:.2f} us")
    print(f"  CUSTOM_AR_LATENCY_PER_PEER_S {ar_peer * 1e6:.2f} us")
    fitted = step(hbm, kernel_s, ar, ar_peer)
    print("\nfit rows with these constants:")
    for r, p in zip(rows, fitted):
        pub = _published_seconds(r)
        print(f"  {r.id:<16} predicted {1e3 * p['predicted_s']:7.3f} ms  published "
              f"{1e3 * pub:7.3f} ms  err {100 * (p['predicted_s'] / pub - 1):+6.1f}%")
    return 0


def _nnls(a, y):
    """Non-negative least squares (all four constants are times or a reciprocal)."""
    import numpy as np

    try:
        from scipy.optimize import nnls

        return nnls(a, y)[0]
    except ImportError:  # active-set by hand: drop negative coefficients and re-solve
        free = list(range(a.shape[1]))
        while True:
            sol = np.linalg.lstsq(a[:, free], y, rcond=None)[0]
            if (sol >= 0).all():
                out = np.zeros(a.shape[1])
                out[free] = sol
                return out
            free.pop(int(np.argmin(sol)))


# --------------------------------------------------------------------------- report


PHASES = ("prefill", "decode", "request", "all_reduce")


def _summary_line(label: str, results: list[dict]) -> str:
    errs = [abs(r["error"]) for r in results if r["error"] is not None]
    if not errs:
        return f"{label:<44} n=0"
    worst = max((r for r in results if r["error"] is not None), key=lambda r: abs(r["error"]))
    return (f"{label:<44} n={len(errs):<3} median |err| {100 * statistics.median(errs):6.1f}%"
            f"   worst {100 * worst['error']:+7.1f}% ({worst['id']})")


def summary(results: list[dict]) -> list[str]:
    lines = []
    groups = [("all rows", results)]
    for phase in PHASES:
        groups.append((f"  phase {phase}", [r for r in results if r["phase"] == phase]))
    for split in ("fit", "eval"):
        part = [r for r in results if r["split"] == split]
        groups.append((f"set {split}", part))
        for phase in PHASES:
            groups.append((f"  {split}, phase {phase}", [r for r in part if r["phase"] == phase]))
    modelled = [r for r in results if not r["not_modelled"]]
    groups.append(("runtime modelled (all sets)", modelled))
    groups.append(("runtime modelled, set fit", [r for r in modelled if r["split"] == "fit"]))
    groups.append(("runtime modelled, set eval (the target)",
                   [r for r in modelled if r["split"] == "eval"]))
    for label, part in groups:
        lines.append(_summary_line(label, part))
    return lines


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if unit != "ms" or value >= 10 else f"{value:.2f}"


def render(results: list[dict]) -> str:
    header = (f"{'id':<22} {'model':<12} {'GPU x n':<17} {'tp/pp':<5} {'phase':<10} {'b':>2} "
              f"{'tokens':>11} {'runtime':<13} {'unit':<10} {'published':>9} {'predicted':>9} "
              f"{'err':>8} {'set':<4} {'source':<14}")
    lines = [header, "-" * len(header)]
    short_runtime = {"cuda graphs (torch.compile reduce-overhead)": "cuda-graphs"}
    for r in results:
        if r["phase"] in ("decode", "request"):
            tokens = f"{r['tokens']}+{r['generated']}"
        elif r["phase"] == "prefill":
            tokens = str(r["tokens"])
        else:
            tokens = f"{r['nbytes'] / 2**30:g} GiB"
        runtime = short_runtime.get(r["runtime"], r["runtime"].split(" (")[0])
        runtime = "TensorRT-LLM" if runtime.startswith("TensorRT-LLM") else runtime
        err = "infeas." if r["error"] is None else f"{100 * r['error']:+.1f}%"
        mark = "*" if r["not_modelled"] else " "
        lines.append(
            f"{r['id']:<22} {r['model'] or '-':<12} {r['gpu'] + ' x' + str(r['gpus']):<17} "
            f"{str(r['tp']) + '/' + str(r['pp']):<5} {r['phase']:<10} {r['batch']:>2} "
            f"{tokens:>11} {runtime[:13]:<13} {r['unit']:<10} "
            f"{_fmt(r['published'], r['unit']):>9} {_fmt(r['predicted'], r['unit']):>9} "
            f"{err:>8}{mark}{r['split']:<4} {r['source']:<14}")
    lines.append("")
    lines.append("err = predicted time / published time - 1 (rates compared as the time they "
                 "imply); * = not modelled (below)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print every row as JSON")
    parser.add_argument("--fit", action="store_true",
                        help="fit the GPU constants to the modelled fit rows and print them")
    args = parser.parse_args(argv)
    if args.fit:
        return fit()
    start = time.perf_counter()
    results = predict_rows()
    wall = time.perf_counter() - start
    if args.json:
        print(json.dumps({"rows": results, "summary": summary(results), "wall_s": wall,
                          "sources": SOURCES}, indent=2))
        return 0
    print(f"{len(results)} published measurements; predictions by the planner's cost model "
          "(constants fitted to the fit rows only: `--fit`)\n")
    print(render(results))
    print("\nnot modelled:")
    for r in results:
        if r["not_modelled"]:
            print(f"  {r['id']:<22} " + "; ".join(r["not_modelled"]))
    print("\nerror summary (|err| = |predicted time / published time - 1|):")
    for line in summary(results):
        print(line)
    print(f"\n{wall:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
