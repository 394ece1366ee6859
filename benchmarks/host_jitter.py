"""Does the host CPU itself slow down in bursts? Times a fixed unit of pure-Python work, over and over, with no GPU
and no asyncbatch involved.

The stall report found host phases of the engine running 10-30x longer than usual, in bursts, on the CPU (user
time = wall time, no faults, no context switches). If the same bursts show up here, in a loop that does nothing
but arithmetic on one thread, their cause is the machine (a virtual CPU that is descheduled or slowed), not the
engine's code. Prints the distribution of unit times, the slow units (> `--slow` x the median) and how they
cluster, and the CPU each slow unit ran on.

    python benchmarks/host_jitter.py --out jitter.json --seconds 20
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import resource
import statistics
import time

_libc = ctypes.CDLL(None)


def current_cpu() -> int:
    return _libc.sched_getcpu()


def unit(n: int) -> int:
    acc = 0
    for i in range(n):
        acc = (acc * 31 + i) & 0xFFFF
    return acc


def calibrate(target_s: float) -> int:
    n = 1000
    while True:
        t = time.perf_counter()
        unit(n)
        dt = time.perf_counter() - t
        if dt > target_s / 4:
            return max(1, int(n * target_s / dt))
        n *= 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--unit-us", type=float, default=300.0, help="target duration of one work unit")
    ap.add_argument("--slow", type=float, default=5.0, help="a unit slower than this many medians is 'slow'")
    args = ap.parse_args()
    n = calibrate(args.unit_us * 1e-6)
    times, cpus, stamps = [], [], []
    ru0 = resource.getrusage(resource.RUSAGE_THREAD)
    epoch0 = time.time()
    end = time.perf_counter() + args.seconds
    while (t := time.perf_counter()) < end:
        unit(n)
        times.append(time.perf_counter() - t)
        stamps.append(t)
        cpus.append(current_cpu())
    ru1 = resource.getrusage(resource.RUSAGE_THREAD)
    med = statistics.median(times)
    slow = [i for i, d in enumerate(times) if d > args.slow * med]
    bursts, last = [], None
    for i in slow:  # consecutive slow units (within 2 units of each other) form one burst
        if last is not None and i - last <= 2:
            bursts[-1].append(i)
        else:
            bursts.append([i])
        last = i
    q = statistics.quantiles(times, n=1000)
    report = dict(
        python=platform.python_version(), machine=platform.machine(), units=len(times), unit_iterations=n,
        median_us=med * 1e6, p99_us=q[989] * 1e6, p999_us=q[998] * 1e6, max_us=max(times) * 1e6,
        slow_units=len(slow), slow_time_ms=sum(times[i] - med for i in slow) * 1e3,
        started_epoch=epoch0,
        bursts=[dict(at_s=stamps[b[0]] - stamps[0], units=len(b), worst_x=max(times[i] for i in b) / med,
                     cpus=sorted({cpus[i] for i in b})) for b in bursts],
        cpus_used=sorted(set(cpus)), voluntary_switches=ru1.ru_nvcsw - ru0.ru_nvcsw,
        involuntary_switches=ru1.ru_nivcsw - ru0.ru_nivcsw,
        user_s=ru1.ru_utime - ru0.ru_utime, system_s=ru1.ru_stime - ru0.ru_stime, wall_s=args.seconds)
    print(f"{len(times)} units of {med * 1e6:.0f} us (median); p99 {report['p99_us']:.0f} us, p99.9 "
          f"{report['p999_us']:.0f} us, max {report['max_us']:.0f} us")
    print(f"{len(slow)} units > {args.slow}x the median in {len(bursts)} bursts, {report['slow_time_ms']:.1f} ms "
          f"lost; user {report['user_s']:.2f} s, system {report['system_s']:.2f} s of {args.seconds:.0f} s; "
          f"switches: {report['voluntary_switches']} voluntary, {report['involuntary_switches']} involuntary")
    for b in report["bursts"][:15]:
        print(f"  at {b['at_s']:7.3f} s: {b['units']} slow units, worst {b['worst_x']:.1f}x, cpu {b['cpus']}")
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
