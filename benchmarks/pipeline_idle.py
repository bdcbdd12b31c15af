"""Where a pipeline step's idle time comes from, read off the executor's own clock (for
benchmarks/pipeline.py, which times each step's actions on every rank: `Steps` below).

Per plait run, over its timed steps:
- replayed: the bubble of each step's own action times run through the order it ran in by plait's
  simulator (each action starts when its rank is free and its inputs exist; no message costs
  anything). Equal to the measured bubble when nothing but waiting for inputs keeps a rank idle:
  then what the measured bubble adds to the simulated one (the per-stage medians) comes from how
  the action times vary within and between steps, not from the executor.
- steady: the same replay with each rank's action times in a step scaled so that the rank's compute
  in that step is its median over the steps: each rank at its usual pace, each step's own shape.
  What it takes off the replayed bubble is what whole-step changes of one rank's pace cost (on a
  shared machine a process's step can run tens of per cent slower or faster than its usual), and
  `pace` is the median size of those changes, relative.
- overlapped: the share of each rank's compute time through which the other rank computed too.
- alone / overlapped: each (kind, stage)'s median action time when the other rank computed
  through less than 30 % of it, and through more than 90 %. If the two ranks slowed each other
  down (two cores sharing caches and memory bandwidth), the second would be the longer.
- spread: the median distance of an action's time from its (kind, stage)'s median, relative.
Timestamps are `time.perf_counter` seconds, which processes on one machine share: CPU only.
"""

from __future__ import annotations

import statistics

from plait.parallel.schedule import Action, simulate

# Per rank, per timed step, the executor's (action, start, end) in the order they ran.
Steps = list[list[list[tuple[Action, float, float]]]]

ALONE, OVERLAPPED = 0.3, 0.9


def replayed_bubble(windows: list[list[tuple[Action, float, float]]], pp: int, m: int, virtual: int,
                    layout: str) -> float:
    """The bubble of one step's own action times (one list per rank) run through its own order."""
    schedule = {r: [a for a, _, _ in acts] for r, acts in enumerate(windows)}
    cost = {a: end - start for acts in windows for a, start, end in acts}
    return simulate(schedule, pp, m, virtual, layout=layout, action_cost=cost).bubble


def paced(windows: list[list[tuple[Action, float, float]]], usual: list[float]) -> dict[Action, float]:
    """Each action's time in one step, scaled so that its rank's compute adds up to `usual[rank]`."""
    cost = {}
    for acts, target in zip(windows, usual):
        busy = sum(end - start for _, start, end in acts)
        cost.update({a: (end - start) * target / busy for a, start, end in acts})
    return cost


def overlaps(windows: list[list[tuple[Action, float, float]]]) -> list[tuple[int, Action, float, float]]:
    """(rank, action, its seconds, the share of them during which another rank computed) for each
    action of one step."""
    out = []
    for r, acts in enumerate(windows):
        others = [(s, e) for q, theirs in enumerate(windows) if q != r for _, s, e in theirs]
        for action, start, end in acts:
            shared = sum(max(0.0, min(end, e) - max(start, s)) for s, e in others)
            out.append((r, action, end - start, shared / (end - start) if end > start else 0.0))
    return out


def idle_report(steps: Steps, pp: int, m: int, virtual: int, layout: str) -> dict:
    """The figures of the module's doc over every timed step of one run."""
    per_step = [[rank[i] for rank in steps] for i in range(len(steps[0]))]
    replayed = statistics.median(replayed_bubble(w, pp, m, virtual, layout) for w in per_step)
    busy_per_step = [[sum(end - start for _, start, end in acts) for acts in w] for w in per_step]
    usual = [statistics.median(b[r] for b in busy_per_step) for r in range(pp)]
    steady = statistics.median(
        simulate({r: [a for a, _, _ in acts] for r, acts in enumerate(w)}, pp, m, virtual, layout=layout,
                 action_cost=paced(w, usual)).bubble for w in per_step)
    pace = statistics.median(abs(b[r] / usual[r] - 1) for b in busy_per_step for r in range(pp))
    busy, shared = [0.0] * pp, [0.0] * pp
    times: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for windows in per_step:
        for r, action, seconds, share in overlaps(windows):
            busy[r] += seconds
            shared[r] += seconds * share
            times.setdefault((action.kind, action.stage), []).append((seconds, share))
    kinds = {}
    deviations = []
    for key, ts in sorted(times.items(), key=lambda kv: (kv[0][1], "FBIW".index(kv[0][0]))):
        alone = [t for t, share in ts if share < ALONE]
        overlapped = [t for t, share in ts if share > OVERLAPPED]
        kinds[key] = (statistics.median(alone) if alone else None,
                      statistics.median(overlapped) if overlapped else None)
        mid = statistics.median(t for t, _ in ts)
        deviations += [abs(t - mid) / mid for t, _ in ts]
    return {"replayed": replayed, "steady": steady, "pace": pace,
            "overlapped": [s / b for s, b in zip(shared, busy)], "kinds": kinds,
            "spread": statistics.median(deviations)}


def format_report(name: str, report: dict, measured: float, simulated: float) -> str:
    """One run's line: bubbles, overlapped shares, action times alone / overlapped in ms, spread."""
    def ms(t):
        return "-" if t is None else f"{t * 1e3:.1f}"

    kinds = "  ".join(f"{kind}{stage} {ms(a)}/{ms(o)}" for (kind, stage), (a, o) in report["kinds"].items())
    shares = " / ".join(f"{s:.2f}" for s in report["overlapped"])
    return (f"  {name}: bubble measured {measured:.3f}, replayed {report['replayed']:.3f}, "
            f"steady {report['steady']:.3f}, simulated {simulated:.3f}; pace {report['pace'] * 100:.1f} %; "
            f"overlapped {shares}; spread {report['spread'] * 100:.1f} %\n"
            f"      alone/overlapped ms: {kinds}")
