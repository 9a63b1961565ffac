#!/usr/bin/env python3
"""A model of a restart storm (`brpc-bench storm N`), for trying reconnect
policies before spending a real run on them. It is a model, not a
measurement: quote the bench, not this.

N agents notice the restart evenly over their keep-alive interval and dial.
The server queues at most QUEUE clients, each for at most WAIT seconds (then
refuses it); it also refuses a client arriving at a full queue. Two cores
are shared by everything: each second they give 2 core-seconds, less the
connected agents' keep-alives; a refused attempt costs REFUSAL of them and a
handshake HANDSHAKE (both ends together). A refused agent waits its busy
backoff and dials again.

The costs below were fitted (2026-12-05) to storms run on the 2-core bench
machine: with them the model gives 7.15 attempts per agent at 100 000 agents
with the busy backoff doubling from 1 s to 30 s (7.19 measured) and 2.72
with 15-30 s (2.62), in 175 and 150 s (151-201 and 153 s measured). For the
fifteen-fold backoff made the default afterwards (1 s, 15 s, 30 s) it
predicted 4.12 attempts and 150 s (3.89-4.23 and 163-168 s measured). Below that it
refuses more than the bench saw: at 50 000, 4.62 attempts per agent and 97 s
with doubling (2.51 and 38 s measured in one run, 3.67 and 71 s in
another); at 30 000 it refuses 3% of the agents
(none measured), so a long backoff shows there as a long tail (40 s with
15-30 s; 14 s measured). It has no handshake timeouts: its attempts are
all refusals, where 0.98 of the 7.19 measured were timeouts.

    python3 brpc-bench/model/storm.py
"""
import heapq
import random

HANDSHAKE = 0.9e-3   # CPU seconds per successful handshake, both ends
REFUSAL = 0.29e-3    # CPU seconds per refused attempt, both ends
KEEP_ALIVE = 8.7e-6  # CPU seconds per connected agent per second
QUEUE = 8192         # 64 per handshake slot, 128 slots
WAIT = 5.0           # half the Hello limit
NOTICE = 10.0        # the agents' keep-alive interval


def storm(backoff, n, seed=1, queue=QUEUE, wait=WAIT, limit=600.0, dt=0.01):
    """(seconds until all back or None, attempts per agent, {0.5: s, 0.9: s,
    0.99: s}); backoff(rng, k) is the delay after an agent's k-th refusal
    (k from 0)."""
    rng = random.Random(seed)
    dials = [(rng.uniform(0, NOTICE), agent, 0) for agent in range(n)]
    heapq.heapify(dials)
    waiting, head = [], 0
    connected = attempts = 0
    credit, t, marks = 0.0, 0.0, {}
    while t < limit:
        t += dt
        cpu = 2.0 * dt - connected * KEEP_ALIVE * dt

        def refuse(agent, k):
            nonlocal cpu
            cpu -= REFUSAL
            heapq.heappush(dials, (t + backoff(rng, k), agent, k + 1))

        while dials and dials[0][0] <= t:
            _, agent, k = heapq.heappop(dials)
            attempts += 1
            if len(waiting) - head >= queue:
                refuse(agent, k)
            else:
                waiting.append((t, agent, k))
        while head < len(waiting) and t - waiting[head][0] > wait:
            _, agent, k = waiting[head]
            head += 1
            refuse(agent, k)
        credit += cpu
        while head < len(waiting) and credit >= HANDSHAKE:
            credit -= HANDSHAKE
            head += 1
            connected += 1
            for share in (0.5, 0.9, 0.99):
                if share not in marks and connected >= share * n:
                    marks[share] = t
        if head >= len(waiting):
            credit = min(credit, 0.0)
        if connected >= n:
            return t, attempts / n, marks
    return None, attempts / n, marks


def exponential(first, longest, factor=2):
    """A busy backoff from `first`, growing `factor`-fold to `longest`, each
    delay plus up to 100% jitter: brpc's until 2026-12-05 doubled (1-30 s),
    brpc's since grows fifteen-fold (1 s, then 15 s, then 30 s), except
    after a GoAway (1, 2, 4, 8 s first), which a killed server never sends."""
    def delay(rng, k):
        base = min(longest, first * factor ** k)
        return base + rng.uniform(0, base)
    return delay


def uniform(low, high):
    """A delay drawn evenly from [low, high] after every refusal."""
    return lambda rng, k: rng.uniform(low, high)


if __name__ == "__main__":
    for name, backoff in [("1-30 s doubling", exponential(1, 30)),
                          ("1, 15, 30 s (default)", exponential(1, 30, 15)),
                          ("15-30 s", exponential(15, 30))]:
        for n in (30_000, 50_000, 100_000):
            done, per_agent, marks = storm(backoff, n)
            shown = ", ".join(f"{int(s * 100)}%: {v:.0f} s" for s, v in marks.items())
            print(f"{name:22} {n:>7} agents: all back "
                  f"{'not within the limit' if done is None else f'{done:.0f} s'}"
                  f" ({shown}), {per_agent:.2f} attempts per agent")
    # The variants BENCHMARKS.md quotes.
    variants = [
        ("uniform 1-80 s", uniform(1, 80), 100_000, {}),
        ("uniform 10-80 s", uniform(10, 80), 100_000, {}),
        ("1-30 s, queue 16384 for 10 s", exponential(1, 30), 50_000,
         dict(queue=16384, wait=10.0)),
        ("uniform 5-60 s, queue 16384 for 10 s", uniform(5, 60), 100_000,
         dict(queue=16384, wait=10.0)),
        ("uniform 5-60 s, queue 16384 for 10 s", uniform(5, 60), 50_000,
         dict(queue=16384, wait=10.0)),
        ("no refusals (perfect pacing)", exponential(1, 30), 100_000,
         dict(queue=10**9, wait=1e9)),
    ]
    for name, backoff, n, server in variants:
        done, per_agent, _ = storm(backoff, n, **server)
        print(f"{name:38} {n:>7} agents: all back "
              f"{'not within the limit' if done is None else f'{done:.0f} s'}"
              f", {per_agent:.2f} attempts per agent")
