"""The fixed costs behind issue 15's whole-command numbers, each measured on its own.

1. Imports, each in a fresh interpreter (CPU seconds of that child, and its wall clock):
   `img2dataset.writer` (what the download worker imported to write a tar), `ray.data` (what the
   build imported for a shuffle it no longer runs), `torch`, and `pipeline.download` (what the
   download worker imports now).
2. Ray, in a fresh process per variant: `ray.init` of a local instance, then two 1-CPU actors
   ready, with and without a runtime_env (`filip build` passes none to a local instance), then
   `ray.shutdown()` plain or after killing the autoscaler monitor first (`stop_ray`).
3. Back-translation setup (the four tiny MarianMT models built here, CTranslate2 engine, the
   conversion already cached) in a fresh process that sees no GPU (CUDA_VISIBLE_DEVICES="", as a
   Ray actor given none): CPU seconds, peak RSS (VmHWM), and whether torch was imported. `--repo` runs it
   against another checkout (e.g. a `git worktree` of an older commit) for the before/after pair.

Prints one JSON line.

    .venv/bin/python bench/fixed_costs.py
    git worktree add /tmp/before 8f501dc && .venv/bin/python bench/fixed_costs.py --repo /tmp/before
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

RAY_PROBE = """
import json, os, sys, time
import ray
from pipeline.ray_adapter import LOCAL_SYSTEM_CONFIG, stop_ray
with_env, kill_monitor = sys.argv[1] == "1", sys.argv[2] == "1"
kwargs = dict(include_dashboard=False, configure_logging=False, address="local", _system_config=LOCAL_SYSTEM_CONFIG)
if with_env:
    kwargs["runtime_env"] = {"env_vars": {"SOME_SETTING": "1"}}
start = time.perf_counter()
ray.init(**kwargs)
initialised = time.perf_counter()

@ray.remote(num_cpus=1)
class Probe:
    def pid(self):
        return os.getpid()

actors = [Probe.remote() for _ in range(2)]
ray.get([a.pid.remote() for a in actors])
ready = time.perf_counter()
for actor in actors:
    ray.kill(actor)
stop_ray() if kill_monitor else ray.shutdown()
print(json.dumps({"init_s": initialised - start, "two_actors_ready_s": ready - initialised,
                  "shutdown_s": time.perf_counter() - ready}))
"""

BT_PROBE = """
import json, sys, time
from filters.backtranslation import BackTranslationConfig, BackTranslator

def peak_mib():
    # VmHWM starts again at exec; ru_maxrss would carry the parent's peak into the child
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

models = json.loads(sys.argv[1])
cpu = time.process_time()
translator = BackTranslator(BackTranslationConfig(models=models, max_new_tokens=8))
translator.setup()
translator.translate(["a dog runs on the grass"])
print(json.dumps({"setup_cpu_s": time.process_time() - cpu, "engines": sorted(set(translator.engines.values())),
                  "peak_rss_mib": peak_mib(),
                  "torch_imported": "torch" in sys.modules}))
"""


def _child(args: list[str], cwd: Path, env: dict | None = None) -> tuple[str, float, float]:
    """Run a Python child; its stdout, wall seconds and CPU seconds (user + system)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], cwd=cwd, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{args[:2]} exited {done.returncode}:\n{done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return done.stdout, wall, cpu


def imports(repo: Path) -> dict:
    out = {}
    for module in ("img2dataset.writer", "ray.data", "torch", "pipeline.download"):
        _, wall, cpu = _child(["-c", f"import {module}"], repo, {"NO_ALBUMENTATIONS_UPDATE": "1"})
        out[module] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}
    return out


def ray_variants(repo: Path) -> dict:
    out = {}
    for name, flags in (("runtime_env, plain shutdown", ["1", "0"]), ("no runtime_env, plain shutdown", ["0", "0"]),
                        ("no runtime_env, monitor killed first", ["0", "1"])):
        stdout, _, _ = _child(["-c", RAY_PROBE, *flags], repo)
        out[name] = {k: round(v, 2) for k, v in json.loads(stdout.strip().splitlines()[-1]).items()}
    return out


def backtranslation_setup(repo: Path, models: dict[str, str]) -> dict:
    env = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    _child(["-c", BT_PROBE, json.dumps(models)], repo, env)  # converts once; the cache serves the next
    stdout, wall, cpu = _child(["-c", BT_PROBE, json.dumps(models)], repo, env)
    found = json.loads(stdout.strip().splitlines()[-1])
    return {**{k: round(v, 2) if isinstance(v, float) else v for k, v in found.items()},
            "process_cpu_s": round(cpu, 2), "process_wall_s": round(wall, 2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose code the children run")
    parser.add_argument("--skip-ray", action="store_true", help="imports and back-translation only")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from filters.backtranslation.tiny_models import build_tiny_marian_models

    report: dict = {"bench": "fixed_costs", "repo": "this checkout" if args.repo == REPO else str(args.repo),
                    "load_start": os.getloadavg()[0], "imports": imports(args.repo)}
    if not args.skip_ray:
        report["ray"] = ray_variants(args.repo)
    with tempfile.TemporaryDirectory(prefix="fixed-costs-") as tmp:
        corpus = ["a dog runs on the grass", "two children play in the park", "a man rides a red bike"] * 50
        models = build_tiny_marian_models(Path(tmp), corpus)
        report["backtranslation_setup"] = backtranslation_setup(args.repo, models)
    report["load_end"] = os.getloadavg()[0]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
