"""Run one command as a subprocess and measure it whole: wall clock from start to exit, peak memory
and CPU time of its entire process tree, and the time of each line it prints.

The benchmarks of whole commands (`bench/build_vs_img2dataset.py`, `bench/build.py`) use it for
both sides, so both are measured the same way.

- Peak memory: every `interval` seconds the tree (the command and all its descendants: for a local
  Ray, the driver's gcs_server and raylet and the raylet's workers; for img2dataset, its pool
  processes) is listed and the resident set sizes summed; the peak is the largest sum. Shared
  pages (Ray's object store, copy-on-write after fork) count once per process that maps them, so
  the sum is an upper bound on the memory the tree needs.
- CPU: `rusage_cpu_seconds` is this process's RUSAGE_CHILDREN difference over the run: exact for
  every descendant that its parent waited for. `sampled_cpu_seconds` sums each process's last
  sampled user + system time (a process that lived less than `interval` is missed); the CPU
  series over time, and so the CPU of a time window, comes from the samples.
"""
from __future__ import annotations

import os
import resource
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, as /proc/loadavg gives them."""
    return [round(value, 2) for value in os.getloadavg()]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class CommandRun:
    """What one measured command did: its exit status, clocks, memory and printed lines."""

    command: list[str]
    returncode: int
    wall_seconds: float
    peak_rss_bytes: int
    peak_processes: int
    rusage_cpu_seconds: float
    sampled_cpu_seconds: float
    process_names: dict[str, int]      # name -> distinct processes of that name seen in the tree
    cpu_by_name: dict[str, float]      # name -> sampled CPU seconds of the processes of that name
    first_seen: dict[str, float]       # name -> seconds since start when one was first sampled
    left_running: list[str]            # descendants still alive after the command exited
    load_start: list[float]
    load_end: list[float]
    lines: list[tuple[float, str]]     # (seconds since start, line) of the kept lines
    series: list[tuple[float, int, float]] = field(repr=False)  # (seconds, tree RSS, tree CPU s)

    def cpu_between(self, begin: float, end: float) -> float:
        """Sampled tree CPU seconds spent between two times (seconds since the start)."""
        def at(moment: float) -> float:
            before = [cpu for seconds, _, cpu in self.series if seconds <= moment]
            return before[-1] if before else 0.0
        return max(0.0, at(end) - at(begin))

    def summary(self) -> dict:
        return {"returncode": self.returncode, "wall_seconds": round(self.wall_seconds, 2),
                "peak_rss_mib": round(self.peak_rss_bytes / 2**20, 1), "peak_processes": self.peak_processes,
                "rusage_cpu_seconds": round(self.rusage_cpu_seconds, 2),
                "sampled_cpu_seconds": round(self.sampled_cpu_seconds, 2),
                "load_start": self.load_start, "load_end": self.load_end,
                "process_names": self.process_names, "cpu_by_name": self.cpu_by_name, "first_seen": self.first_seen,
                "left_running": self.left_running}


class _TreeSampler(threading.Thread):
    """Samples RSS and CPU of `root` and its descendants until stopped."""

    def __init__(self, root: int, start: float, interval: float) -> None:
        super().__init__(daemon=True)
        self.root, self.start_time, self.interval = root, start, interval
        self.stopped = threading.Event()
        self.known: dict[tuple[int, float], psutil.Process] = {}
        self.cpu: dict[tuple[int, float], float] = {}
        self.names: dict[tuple[int, float], str] = {}
        self.first_seen: dict[str, float] = {}
        self.peak_rss = self.peak_processes = 0
        self.series: list[tuple[float, int, float]] = []

    def run(self) -> None:
        while not self.stopped.is_set():
            self.sample()
            self.stopped.wait(self.interval)

    def sample(self) -> None:
        try:
            root = psutil.Process(self.root)
            processes = [root, *root.children(recursive=True)]
        except psutil.Error:
            return  # the command has exited
        rss = 0
        for process in processes:
            try:
                with process.oneshot():
                    key = (process.pid, process.create_time())
                    times = process.cpu_times()
                    rss += process.memory_info().rss
                    self.cpu[key] = times.user + times.system
                    if key not in self.names:
                        self.names[key] = process.name()
                        self.first_seen.setdefault(self.names[key], round(time.perf_counter() - self.start_time, 2))
                        self.known[key] = process
            except psutil.Error:
                continue  # it ended between the listing and the reading
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_processes = max(self.peak_processes, len(processes))
        self.series.append((time.perf_counter() - self.start_time, rss, sum(self.cpu.values())))


def _pump(stream: IO[str], log: IO[str], lock: threading.Lock, start: float,
          keep: Callable[[str], bool], lines: list[tuple[float, str]]) -> None:
    for line in stream:
        seconds = time.perf_counter() - start
        with lock:
            log.write(f"{seconds:9.2f} {line}")
            if keep(line):
                lines.append((round(seconds, 3), line.rstrip("\n")))


def run_measured(command: list[str], log_path: Path, env: dict[str, str] | None = None,
                 keep: Callable[[str], bool] = lambda line: line.startswith("["), interval: float = 0.2,
                 timeout: float = 3600.0) -> CommandRun:
    """Run `command` to its exit, measuring its whole tree; stdout and stderr go to `log_path`
    (each line stamped with its time); the lines `keep` accepts are also returned.
    A command still running after `timeout` seconds is killed with its descendants."""
    env = {**(env or os.environ), "PYTHONUNBUFFERED": "1"}  # lines arrive when printed, not at exit
    load_start = load_average()
    cpu_before = _children_cpu()
    lines: list[tuple[float, str]] = []
    lock = threading.Lock()
    with open(log_path, "w") as log:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=env, errors="replace")
        sampler = _TreeSampler(process.pid, start, interval)
        sampler.start()
        pumps = [threading.Thread(target=_pump, args=(stream, log, lock, start, keep, lines), daemon=True)
                 for stream in (process.stdout, process.stderr)]
        for pump in pumps:
            pump.start()
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for child in psutil.Process(process.pid).children(recursive=True):
                child.kill()
            process.kill()
            returncode = process.wait()
        wall = time.perf_counter() - start
        sampler.stopped.set()
        sampler.join()
        for pump in pumps:
            pump.join(timeout=10)
    # A descendant may take a moment to follow its parent out (multiprocessing's resource tracker).
    psutil.wait_procs([proc for key, proc in sampler.known.items() if key[0] != process.pid and _alive(proc)],
                      timeout=3)
    left = [f"{sampler.names[key]} (pid {key[0]})" for key, proc in sampler.known.items()
            if key[0] != process.pid and _alive(proc)]
    names: dict[str, int] = {}
    cpu_by_name: dict[str, float] = {}
    for key, name in sampler.names.items():
        names[name] = names.get(name, 0) + 1
        cpu_by_name[name] = round(cpu_by_name.get(name, 0.0) + sampler.cpu.get(key, 0.0), 2)
    return CommandRun(command=command, returncode=returncode, wall_seconds=wall,
                      peak_rss_bytes=sampler.peak_rss, peak_processes=sampler.peak_processes,
                      rusage_cpu_seconds=_children_cpu() - cpu_before,
                      sampled_cpu_seconds=sum(sampler.cpu.values()), process_names=names, cpu_by_name=cpu_by_name,
                      first_seen=sampler.first_seen,
                      left_running=left, load_start=load_start, load_end=load_average(),
                      lines=sorted(lines), series=sampler.series)


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
