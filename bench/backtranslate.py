"""Back-translation throughput: transformers' ``generate``, the fast greedy loop and CTranslate2.

All engines translate the same inputs with the same random weights shaped like opus-mt (d_model 512,
6+6 layers, 8 heads, FFN 2048, vocabulary 58,101). The model is saved with a MarianTokenizer and
converted by the translator's own code (``ct2_engine.converted_model``). Every output is forced to
exactly ``--new-tokens`` decoder steps, so the work does not depend on what random weights emit.
Engines take turns in ``--rounds`` rounds, so a change of load hits all of them; ratios are paired
per round. Prints one JSON line per configuration and round, one agreement line per dtype (share of
sequences identical to ``generate``'s, natural stopping), then a summary: each engine's median rate,
its ratios to ``generate`` and ``fast`` and the hours for 1.2e9 translations (300M captions, four
models). Usage:

    python bench/backtranslate.py --device cpu --threads 2 --engines generate,fast,ct2-float32,ct2-int8
    python bench/backtranslate.py --device cuda --batch-sizes 4096,8192 --engines generate,fast-graphs,ct2-float16
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from filters.backtranslation.fast_greedy import FastGreedyDecoder  # noqa: E402

TRANSLATIONS = 1.2e9  # 300M captions x (en->de, de->en, en->ru, ru->en)
VOCAB = 58101
Runner = Callable[[torch.Tensor, torch.Tensor], Any]


def opus_mt_model(dtype: torch.dtype, device: str, seed: int = 0, init_std: float = 0.02) -> torch.nn.Module:
    """A randomly initialised MarianMTModel shaped like Helsinki-NLP/opus-mt-en-de."""
    from transformers import GenerationConfig, MarianConfig, MarianMTModel

    config = MarianConfig(vocab_size=VOCAB, decoder_vocab_size=VOCAB, d_model=512, encoder_layers=6,
                          decoder_layers=6, encoder_attention_heads=8, decoder_attention_heads=8,
                          encoder_ffn_dim=2048, decoder_ffn_dim=2048, max_position_embeddings=512,
                          activation_function="swish", scale_embedding=True, pad_token_id=VOCAB - 1,
                          eos_token_id=0, decoder_start_token_id=VOCAB - 1, forced_eos_token_id=0,
                          init_std=init_std)
    torch.manual_seed(seed)
    model = MarianMTModel(config)
    model.generation_config = GenerationConfig(bad_words_ids=[[VOCAB - 1]], decoder_start_token_id=VOCAB - 1,
                                               eos_token_id=0, pad_token_id=VOCAB - 1, forced_eos_token_id=0)
    return model.to(device=device, dtype=dtype).eval()


def save_model_folder(model: torch.nn.Module, folder: Path) -> None:
    """Save ``model`` as an opus-mt folder: a MarianTokenizer whose vocabulary fills all 58,101 ids."""
    import random

    from transformers import MarianTokenizer

    from filters.backtranslation.tiny_models import marian_vocab, train_sentencepiece

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(500)]
    spm = folder / "bench.spm"
    folder.mkdir(parents=True, exist_ok=True)
    train_sentencepiece([" ".join(rng.choices(words, k=12)) for _ in range(2000)], spm)
    pieces = [p for p in marian_vocab(spm) if p != "<pad>"]
    pieces += [f"▁w{i}" for i in range(VOCAB - 1 - len(pieces))]  # stand-ins up to the model's size
    vocab_path = folder / "vocab.build.json"
    vocab_path.write_text(json.dumps({p: i for i, p in enumerate(pieces + ["<pad>"])}))
    MarianTokenizer(source_spm=str(spm), target_spm=str(spm), vocab=str(vocab_path)).save_pretrained(folder)
    model.save_pretrained(folder)
    vocab_path.unlink()


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


class Ct2Engines:
    """The CTranslate2 engines of the run (``ct2-<compute type>``), converted once from one saved folder."""

    def __init__(self, folder: Path, device: str, threads: int) -> None:
        from transformers import GenerationConfig, MarianTokenizer

        self.folder, self.device, self.threads = folder, device, threads
        self.tokenizer = MarianTokenizer.from_pretrained(folder)
        self.generation = GenerationConfig.from_pretrained(folder)
        self.loaded: dict[str, Any] = {}
        self.conversion_s: dict[str, float] = {}

    def get(self, engine: str) -> Any:
        from filters.backtranslation.ct2_engine import Ct2Direction, converted_model

        if engine not in self.loaded:
            compute_type = engine.removeprefix("ct2-")
            start = time.perf_counter()
            path, _ = converted_model(str(self.folder), compute_type)
            self.conversion_s[engine] = round(time.perf_counter() - start, 2)
            self.loaded[engine] = Ct2Direction(path, self.tokenizer, self.generation, self.device, compute_type,
                                               self.threads)
        return self.loaded[engine]

    def translate(self, engine: str, ids: torch.Tensor, new_tokens: int, forced: bool) -> list[list[int]]:
        """Content token ids per row: ``forced``: exactly ``new_tokens`` steps; else natural stopping."""
        tok = self.tokenizer
        # max_new_tokens + 1: the translator's path stops one step before generate's forced EOS.
        limit = new_tokens + 1 if forced else new_tokens
        out = self.get(engine).translate_tokens([tok.convert_ids_to_tokens(row) for row in ids.tolist()], 1,
                                                limit, ids.shape[0], min_new_tokens=limit if forced else 0)
        return [tok.convert_tokens_to_ids(tokens) for tokens in out]


def make_runner(engine: str, model: torch.nn.Module | None, new_tokens: int, ct2: Ct2Engines) -> Runner:
    """A function (ids, mask) -> outputs for one engine; every engine runs ``new_tokens`` decoder steps."""
    if engine == "generate":
        def run(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                                  min_new_tokens=new_tokens, max_new_tokens=new_tokens)[:, 1:]
        return run
    if engine.startswith("ct2-"):
        ct2.get(engine)  # convert and load outside the timing
        return lambda ids, mask: ct2.translate(engine, ids, new_tokens, forced=True)
    decoder = fast_decoder(engine, model)
    return lambda ids, mask: decoder.generate(ids, mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def measure(engine: str, run: Runner, batch: int, args: argparse.Namespace, warm_up: bool = True) -> dict:
    """Sentences per second (after one warm-up batch when ``warm_up``), timed over at least ``args.seconds``."""
    ids, mask = random_inputs(batch, args.src_len, args.device)
    if warm_up:  # cuBLAS handles, graph capture, CTranslate2's first allocation; checks the output shape
        out = run(ids, mask)
        lengths = {len(row) for row in out} if isinstance(out, list) else {out.shape[1]}
        assert len(out) == batch and lengths == {args.new_tokens}, (engine, lengths)
        sync(args.device)
    reps, start = 0, time.perf_counter()
    while reps < args.min_reps or time.perf_counter() - start < args.seconds:
        run(ids, mask)
        reps += 1
        sync(args.device)
    seconds = time.perf_counter() - start
    return {"engine": engine, "batch": batch, "reps": reps, "seconds": round(seconds, 3),
            "sentences_per_s": round(batch * reps / seconds, 1)}


def _content(rows: list[list[int]]) -> list[list[int]]:
    """Each row up to (without) its first EOS (id 0)."""
    return [row[:row.index(0)] if 0 in row else row for row in rows]


@torch.inference_mode()
def agreement(dtype_name: str, engines: list[str], ct2: Ct2Engines, args: argparse.Namespace) -> dict:
    """Share of sequences (and of token positions) identical to ``generate``'s, same inputs, natural stop.

    ``ct2`` holds the check model (``--check-init-std``): at opus-mt's init_std of 0.02 random weights
    answer almost every input alike, which would make any engine agree.
    """
    model = opus_mt_model(getattr(torch, dtype_name), args.device, init_std=args.check_init_std)
    ids, mask = random_inputs(args.check_batch, args.src_len, args.device, seed=2)
    plain = _content(model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                                    max_new_tokens=args.new_tokens)[:, 1:].tolist())
    # Random weights may emit the same few tokens for every input; these two say how telling the shares are.
    result: dict[str, Any] = {"check": "agreement_with_generate", "dtype": dtype_name, "batch": args.check_batch,
                              "distinct_reference_outputs": len({tuple(row) for row in plain}),
                              "mean_reference_length": round(sum(map(len, plain)) / len(plain), 1)}
    for engine in engines:
        if engine.startswith("ct2-"):
            ours = ct2.translate(engine, ids.cpu(), args.new_tokens, forced=False)
        else:
            ours = _content(fast_decoder(engine, model).generate(ids, mask, max_new_tokens=args.new_tokens).tolist())
        same_tokens = sum(sum(a == b for a, b in zip(x, y)) for x, y in zip(plain, ours))
        positions = sum(max(len(x), len(y), 1) for x, y in zip(plain, ours))
        result[f"{engine}_identical_sequences"] = round(sum(x == y for x, y in zip(plain, ours)) / len(plain), 4)
        result[f"{engine}_identical_tokens"] = round(same_tokens / positions, 4)
    return result


def ct2_float(engine: str) -> str:
    """The float type a CTranslate2 compute type computes in (int8 alone: float32)."""
    return next((f for f in ("bfloat16", "float16") if f in engine), "float32")


@torch.inference_mode()
def profile(engine: str, dtype_name: str, batch: int, args: argparse.Namespace) -> None:
    """Print the kernels that take the most GPU time in one batch of an eager engine."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model = opus_mt_model(getattr(torch, dtype_name), args.device)
    run = make_runner(engine, model, args.new_tokens, None)
    ids, mask = random_inputs(batch, args.src_len, args.device)
    run(ids, mask)
    sync(args.device)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run(ids, mask)
        sync(args.device)
    print(f"profile {engine} {dtype_name} batch {batch}")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=16, max_name_column_width=70))


def build_plan(args: argparse.Namespace, dtypes: list[str], batches: list[int]) -> list[tuple[str, str, int]]:
    """(engine, dtype, batch) triples; a CTranslate2 engine's dtype is its compute type."""
    plan = []
    for engine in args.engines.split(","):
        for dtype_name in [engine.removeprefix("ct2-")] if engine.startswith("ct2-") else dtypes:
            plan += [(engine, dtype_name, b) for b in batches if not ("graphs" in engine and args.device != "cuda")]
    plan += [(e, d, int(b)) for e, d, b in (x.split(":") for x in args.extra.split(",") if x)]
    return plan


def summarise(plan: list[tuple[str, str, int]], rates: dict[tuple[str, str, int], list[float | None]],
              base_dtype: str) -> list[dict]:
    """Per engine, its best configuration by median rate, with ratios paired by round and batch."""
    def paired(config: tuple[str, str, int], peer: str) -> float | None:
        mine, theirs = rates[config], rates.get((peer, base_dtype, config[2]), [])
        ratios = [a / b for a, b in zip(mine, theirs) if a and b]
        return round(statistics.median(ratios), 2) if ratios else None

    rows: list[dict] = []
    for engine in dict.fromkeys(e for e, _, _ in plan):
        measured = [(statistics.median(r), c) for c in plan if c[0] == engine and (r := [x for x in rates[c] if x])]
        if not measured:
            continue
        median, config = max(measured)
        valid = [x for x in rates[config] if x]
        rows.append({"engine": engine, "dtype": config[1], "batch": config[2], "median_sentences_per_s": median,
                     "min": min(valid), "max": max(valid), "ratio_to_generate": paired(config, "generate"),
                     "ratio_to_fast": paired(config, "fast"),
                     "hours_for_1.2e9": round(TRANSLATIONS / median / 3600, 1)})
    best = {row["engine"]: row["median_sentences_per_s"] for row in rows}
    for row in rows:  # best batch against best batch (the paired ratios above keep the batch)
        for peer in ("generate", "fast"):
            row[f"best_ratio_to_{peer}"] = round(row["median_sentences_per_s"] / best[peer], 2) if peer in best \
                else None
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--engines", default="generate,fast,ct2-float32,ct2-int8",
                        help="generate, fast[-graphs][-matmul], ct2-<compute type> (float32, int8, float16 ...)")
    parser.add_argument("--dtypes", default="", help="torch engines; default: float16 on cuda, float32 on cpu")
    parser.add_argument("--batch-sizes", default="")
    parser.add_argument("--extra", default="", help="more engine:dtype:batch triples, comma-separated")
    parser.add_argument("--src-len", type=int, default=24, help="source tokens, EOS included")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--min-reps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the summary takes medians")
    parser.add_argument("--warm-up-once", action="store_true", help="warm-up batch in the first round only")
    parser.add_argument("--profile", default="", help="engine:dtype:batch to profile first (eager engines)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads of every engine (0: torch's default)")
    parser.add_argument("--check-batch", type=int, default=256, help="0: skip the agreement check")
    parser.add_argument("--check-init-std", type=float, default=0.1,
                        help="weights' spread of the agreement model (0.1: most inputs get their own output)")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = args.dtypes.split(",") if args.dtypes else ["float16" if cuda else "float32"]
    batches = [int(b) for b in (args.batch_sizes or ("1024,4096,8192" if cuda else "32")).split(",")]
    plan = build_plan(args, dtypes, batches)
    import ctranslate2
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    env = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__, "ctranslate2": ctranslate2.__version__,
           "threads": torch.get_num_threads(), "src_len": args.src_len, "new_tokens": args.new_tokens,
           "rounds": args.rounds, "load_avg_start": os.getloadavg()}
    print(json.dumps({"environment": env}), flush=True)
    for item in filter(None, args.profile.split(",")):
        engine, dtype_name, batch = item.split(":")
        try:
            profile(engine, dtype_name, int(batch), args)
        except Exception as error:  # noqa: BLE001 - the profile is a diagnosis, not the result
            print(f"profile failed: {error!r}")
    with tempfile.TemporaryDirectory(prefix="bench-backtranslate-") as tmp:
        folder = Path(tmp) / "opus-mt-random"
        save_model_folder(opus_mt_model(torch.float32, "cpu"), folder)  # the same weights as every engine's
        ct2 = Ct2Engines(folder, args.device, torch.get_num_threads())
        models: dict[str, torch.nn.Module] = {}  # one random model per dtype, shared by all configurations
        runners: dict[tuple[str, str], Runner] = {}
        rates: dict[tuple[str, str, int], list[float | None]] = {config: [] for config in plan}
        for round_index in range(args.rounds):
            for engine, dtype_name, batch in plan:
                try:
                    if (engine, dtype_name) not in runners:
                        if not engine.startswith("ct2-") and dtype_name not in models:
                            models[dtype_name] = opus_mt_model(getattr(torch, dtype_name), args.device)
                        runners[engine, dtype_name] = make_runner(engine, models.get(dtype_name), args.new_tokens, ct2)
                    warm_up = round_index == 0 or not args.warm_up_once
                    row = {**measure(engine, runners[engine, dtype_name], batch, args, warm_up), "dtype": dtype_name}
                except Exception as error:  # noqa: BLE001 - one failed configuration must not end the run
                    row = {"engine": engine, "dtype": dtype_name, "batch": batch, "error": repr(error)[:300]}
                row["round"] = round_index
                print(json.dumps(row), flush=True)
                rates[engine, dtype_name, batch].append(row.get("sentences_per_s"))
                if cuda:
                    torch.cuda.empty_cache()
        runners.clear()
        models.clear()
        if args.check_batch:
            check_folder = Path(tmp) / "opus-mt-random-check"
            save_model_folder(opus_mt_model(torch.float32, "cpu", init_std=args.check_init_std), check_folder)
            check_ct2 = Ct2Engines(check_folder, args.device, torch.get_num_threads())
            checked = {(e, ct2_float(e) if e.startswith("ct2-") else d) for e, d, _ in plan if e != "generate"}
            for dtype_name in sorted({d for _, d in checked}):
                engines = sorted(e for e, d in checked if d == dtype_name)
                print(json.dumps(agreement(dtype_name, engines, check_ct2, args)), flush=True)
        summary = {"summary": True, "load_avg_end": os.getloadavg(), "ct2_conversion_s": ct2.conversion_s,
                   "engines": summarise(plan, rates, dtypes[0])}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
