"""Back-translation throughput: plain ``generate`` against the fast greedy loop on the opus-mt architecture.

Random weights (d_model 512, 6+6 layers, 8 heads, FFN 2048, vocabulary 58,101) and every output forced
to exactly ``--new-tokens`` tokens (min_new_tokens = max_new_tokens), so the work does not depend on
what random weights happen to emit. Prints one JSON line per configuration, then a summary line with
the best rate of each engine, the ratio and the GPU-hours for 1.2 billion translations (300M captions
through four models). Usage:

    python bench/backtranslate.py --device cuda --batch-sizes 1024,4096,8192 --engines generate,fast-graphs
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from filters.backtranslation.fast_greedy import FastGreedyDecoder  # noqa: E402

TRANSLATIONS = 1.2e9  # 300M captions x (en->de, de->en, en->ru, ru->en)


def opus_mt_model(dtype: torch.dtype, device: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised MarianMTModel shaped like Helsinki-NLP/opus-mt-en-de."""
    from transformers import GenerationConfig, MarianConfig, MarianMTModel

    vocab = 58101
    config = MarianConfig(vocab_size=vocab, decoder_vocab_size=vocab, d_model=512, encoder_layers=6,
                          decoder_layers=6, encoder_attention_heads=8, decoder_attention_heads=8,
                          encoder_ffn_dim=2048, decoder_ffn_dim=2048, max_position_embeddings=512,
                          activation_function="swish", scale_embedding=True, pad_token_id=vocab - 1,
                          eos_token_id=0, decoder_start_token_id=vocab - 1, forced_eos_token_id=0)
    torch.manual_seed(seed)
    model = MarianMTModel(config)
    model.generation_config = GenerationConfig(bad_words_ids=[[vocab - 1]], decoder_start_token_id=vocab - 1,
                                               eos_token_id=0, pad_token_id=vocab - 1, forced_eos_token_id=0)
    return model.to(device=device, dtype=dtype).eval()


def random_inputs(batch: int, src_len: int, device: str, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids 1..58099 ending in EOS (id 0), all ``src_len`` long; an all-ones attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 58099, (batch, src_len), generator=g)
    ids[:, -1] = 0
    return ids.to(device), torch.ones_like(ids, device=device)


def fast_decoder(engine: str, model: torch.nn.Module) -> FastGreedyDecoder:
    """Engines: fast, fast-graphs, fast-matmul, fast-graphs-matmul (attention by SDPA or two matmuls)."""
    return FastGreedyDecoder(model, cuda_graphs="graphs" in engine,
                             attention="matmul" if engine.endswith("matmul") else "sdpa")


def make_runner(engine: str, model: torch.nn.Module, new_tokens: int):
    """A function (ids, mask) -> generated ids for one engine; both engines force ``new_tokens`` outputs."""
    if engine == "generate":
        def run(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                                  min_new_tokens=new_tokens, max_new_tokens=new_tokens)[:, 1:]
        return run
    decoder = fast_decoder(engine, model)
    return lambda ids, mask: decoder.generate(ids, mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def measure(engine: str, model: torch.nn.Module, batch: int, args: argparse.Namespace) -> dict:
    """Sentences per second after one warm-up batch, timed over at least ``args.seconds``."""
    run = make_runner(engine, model, args.new_tokens)
    ids, mask = random_inputs(batch, args.src_len, args.device)
    out = run(ids, mask)  # warm-up: cuBLAS handles, graph capture
    assert out.shape == (batch, args.new_tokens), out.shape
    sync(args.device)
    reps, start = 0, time.perf_counter()
    while reps < args.min_reps or time.perf_counter() - start < args.seconds:
        run(ids, mask)
        reps += 1
        sync(args.device)
    seconds = time.perf_counter() - start
    del run
    return {"engine": engine, "dtype": str(model.dtype).removeprefix("torch."), "batch": batch, "reps": reps, "seconds": round(seconds, 3),
            "sentences_per_s": round(batch * reps / seconds, 1)}


@torch.inference_mode()
def agreement(dtype_name: str, batch: int, args: argparse.Namespace) -> dict:
    """How often the fast loop's greedy tokens equal ``generate``'s on the same inputs (natural stop)."""
    model = opus_mt_model(getattr(torch, dtype_name), args.device)
    ids, mask = random_inputs(batch, args.src_len, args.device, seed=2)
    plain = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                           max_new_tokens=args.new_tokens)[:, 1:]
    result = {"check": "fast_vs_generate", "dtype": dtype_name, "batch": batch}
    engines = ("fast", "fast-graphs", "fast-graphs-matmul") if args.device == "cuda" else ("fast", "fast-matmul")
    for engine in engines:
        # min_new_tokens 0: natural stopping, as the translator runs.
        ours = fast_decoder(engine, model).generate(
            ids, mask, max_new_tokens=args.new_tokens)
        width = max(plain.shape[1], ours.shape[1])
        pad = model.generation_config.pad_token_id
        a = torch.nn.functional.pad(plain, (0, width - plain.shape[1]), value=pad)
        b = torch.nn.functional.pad(ours, (0, width - ours.shape[1]), value=pad)
        result[f"{engine}_identical_sequences"] = round((a == b).all(dim=1).float().mean().item(), 4)
        result[f"{engine}_identical_tokens"] = round((a == b).float().mean().item(), 4)
    return result


@torch.inference_mode()
def profile(engine: str, dtype_name: str, batch: int, args: argparse.Namespace) -> None:
    """Print the kernels that take the most GPU time in one batch of an eager engine."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model = opus_mt_model(getattr(torch, dtype_name), args.device)
    run = make_runner(engine, model, args.new_tokens)
    ids, mask = random_inputs(batch, args.src_len, args.device)
    run(ids, mask)
    sync(args.device)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run(ids, mask)
        sync(args.device)
    print(f"profile {engine} {dtype_name} batch {batch}")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=16, max_name_column_width=70))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--engines", default="generate,fast,fast-graphs")
    parser.add_argument("--dtypes", default="", help="default: float16 on cuda, float32 on cpu")
    parser.add_argument("--batch-sizes", default="")
    parser.add_argument("--extra", default="", help="more engine:dtype:batch triples, comma-separated")
    parser.add_argument("--src-len", type=int, default=24, help="source tokens, EOS included")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--min-reps", type=int, default=2)
    parser.add_argument("--profile", default="", help="engine:dtype:batch to profile first (eager engines)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--check-batch", type=int, default=256, help="0: skip the agreement check")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = args.dtypes.split(",") if args.dtypes else ["float16" if cuda else "float32"]
    batches = [int(b) for b in (args.batch_sizes or ("1024,4096,8192" if cuda else "16")).split(",")]
    plan = [(e, d, b) for e in args.engines.split(",") for d in dtypes for b in batches
            if not (e == "fast-graphs" and not cuda)]
    plan += [(e, d, int(b)) for e, d, b in (x.split(":") for x in args.extra.split(",") if x)]
    env = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "threads": torch.get_num_threads(), "src_len": args.src_len, "new_tokens": args.new_tokens}
    print(json.dumps({"environment": env}), flush=True)
    for item in filter(None, args.profile.split(",")):
        engine, dtype_name, batch = item.split(":")
        try:
            profile(engine, dtype_name, int(batch), args)
        except Exception as error:  # noqa: BLE001 - the profile is a diagnosis, not the result
            print(f"profile failed: {error!r}")
    best: dict[str, dict] = {}
    models: dict[str, torch.nn.Module] = {}  # one random model per dtype, shared by all configurations
    for engine, dtype_name, batch in plan:
        try:
            if dtype_name not in models:
                models[dtype_name] = opus_mt_model(getattr(torch, dtype_name), args.device)
            row = measure(engine, models[dtype_name], batch, args)
        except Exception as error:  # noqa: BLE001 - one failed configuration must not end the run
            row = {"engine": engine, "dtype": dtype_name, "batch": batch, "error": repr(error)[:300]}
        print(json.dumps(row), flush=True)
        key = "generate" if engine == "generate" else "fast"
        if "sentences_per_s" in row and row["sentences_per_s"] > best.get(key, {}).get("sentences_per_s", 0):
            best[key] = row
        if cuda:
            torch.cuda.empty_cache()
    models.clear()
    if args.check_batch:
        for dtype_name in dict.fromkeys(dtypes + ["float32"]):
            print(json.dumps(agreement(dtype_name, args.check_batch, args)), flush=True)
    summary: dict = {"summary": True, **{f"best_{k}": v for k, v in best.items()}}
    if "generate" in best and "fast" in best:
        summary["ratio"] = round(best["fast"]["sentences_per_s"] / best["generate"]["sentences_per_s"], 2)
    for key, row in best.items():
        summary[f"{key}_hours_for_1.2e9"] = round(TRANSLATIONS / row["sentences_per_s"] / 3600, 1)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
