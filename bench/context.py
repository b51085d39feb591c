"""Context-store benchmark: append, render and get latency for sessions of 10, 100 and 1,000 blocks.

An embedded nats-server and redis-server, one ContextService in this process (so the SDK client
and the service share one event loop: every figure is client + bus + service + Redis, serially),
and the SDK (`ContextClient` on a plain NATS connection) making one request at a time:

1. Append: one block per request to sessions that already hold N blocks. To keep the size ~N,
   each session takes at most N/10 appends (at least 1) and is then deleted; a fresh one is built.
2. Render: the same session of exactly N blocks rendered into a budget of 4,000 tokens.
3. Get: the same session read whole (every block crosses the bus).
4. Where a render's time goes: the service's functions timed directly (Redis read, msgpack decode,
   pydantic validation, selection, the final token count, packing replies).

Sessions are a realistic mix: one SYSTEM block, then USER/AGENT turns and TOOL/MEMORY/KNOWLEDGE
blocks of about 50-150 tokens, relevance spread over 0..1. Capacity is 10M tokens with `prune_at: null`,
so nothing is pruned. Each latency figure is the median of 3 runs (every run is kept in the JSON).
Results go to `bench/results/context.json`. Run with `make bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import nats

from bench.latency import p50_p99_ms
from services.context.app import ContextService, ContextSettings
from services.context.rendering import RenderSettings, _choose, render, segment_tokens
from services.context.sessions import ContextOperations
from services.context.store import Change, Limits, SessionStore
from services.context.tokens import count_tokens
from shared.codec import pack, unpack
from shared.config import Config, parse_config
from shared.context_client import ContextClient
from shared.contracts.context import AppendBlocks, Block, BlockType, NewBlock, RenderReply, SessionReply
from shared.embedded import NatsServer, NatsServerSettings, RedisServer, RedisServerSettings
from shared.ids import new_call_id
from shared.mesh import bootstrap
from shared.outcomes import now_ms
from shared.redis_client import redis_client
from shared.subjects import Subjects

RESULTS = Path(__file__).parent / "results" / "context.json"
SIZES = (10, 100, 1000)
BUDGET_TOKENS = 4000
REPEATS = 3
BUILD_BATCH = 100  # blocks per append while building a session (well under NATS max_payload)
BREAKDOWN_ROUNDS = 20
TOOLS = ("git__git_status", "git__git_log", "fs__read_file", "search__web", "demo__echo")
MIX = ((BlockType.USER, 0.20), (BlockType.AGENT, 0.25), (BlockType.TOOL, 0.30), (BlockType.MEMORY, 0.10),
       (BlockType.KNOWLEDGE, 0.15))
_PROSE = (
    "the service reads every block of the session from redis and renders the most relevant ones into a budget "
    "of tokens so that an agent sees its recent conversation tool results memories and retrieved knowledge "
    "router executor pool worker call result error timeout retry queue stream consumer subject request reply "
    "config principal role budget limit window ledger audit record checkpoint signature chain hash verify "
    "user asked whether deploy failed because migration lock was held longer than expected yesterday morning "
    "agent suggested checking logs metrics dashboard alerts before restarting anything production staging "
    "file path line function class module import test fixture assertion mock patch branch commit merge "
    "status modified added deleted untracked clean ahead behind origin main feature fix docs bench"
)
WORDS = _PROSE.split()


def bench_config() -> Config:
    # 1,000 blocks of this mix store ~780 KB: just over the default 768 KiB cap, well under NATS's 1 MiB
    return parse_config({"context": {"max_tokens": 10_000_000, "prune_at": None, "max_session_bytes": 1_000_000}},
                        source="<bench>")


class BlockFactory:
    """Deterministic blocks of the realistic mix."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._kinds = [kind for kind, _ in MIX]
        self._weights = [weight for _, weight in MIX]

    def _text(self, low: int, high: int) -> str:
        words = self._rng.choices(WORDS, k=self._rng.randint(low, high))
        sentences = [" ".join(words[i:i + 12]).capitalize() + "." for i in range(0, len(words), 12)]
        return " ".join(sentences)

    def system(self) -> NewBlock:
        return NewBlock(type=BlockType.SYSTEM, content="You are a careful operations agent. " + self._text(80, 100))

    def next(self) -> NewBlock:
        kind = self._rng.choices(self._kinds, self._weights)[0]
        if kind is BlockType.TOOL:
            tool = self._rng.choice(TOOLS)
            content = json.dumps({"tool": tool, "ok": True, "output": self._text(40, 120)})
            return NewBlock(type=kind, content=content, relevance=round(self._rng.random(), 3),
                            metadata={"tool": tool, "call_id": f"{self._rng.getrandbits(64):016x}"})
        if kind in (BlockType.USER, BlockType.AGENT):
            return NewBlock(type=kind, content=self._text(45, 140))
        return NewBlock(type=kind, content=self._text(45, 140), relevance=round(self._rng.random(), 3))


async def build_session(ctx: ContextClient, factory: BlockFactory, blocks: int) -> str:
    """A session of exactly `blocks` blocks: one SYSTEM, the rest of the mix."""
    session = await ctx.create("bench-agent", blocks=[factory.system()])
    remaining = blocks - 1
    while remaining > 0:
        batch = min(BUILD_BATCH, remaining)
        await ctx.append(session.session_id, [factory.next() for _ in range(batch)])
        remaining -= batch
    return session.session_id


def latency_summary(seconds: list[float], elapsed_s: float) -> dict[str, Any]:
    p50, p99 = p50_p99_ms(seconds)
    return {"ops": len(seconds), "ops_per_s": round(len(seconds) / elapsed_s, 1), "p50_ms": round(p50, 3),
            "p99_ms": round(p99, 3), "mean_ms": round(statistics.fmean(seconds) * 1000, 3)}


async def timed_loop(op: Callable[[], Awaitable[Any]], ops: int) -> dict[str, Any]:
    latencies = []
    started = time.perf_counter()
    for _ in range(ops):
        t0 = time.perf_counter()
        await op()
        latencies.append(time.perf_counter() - t0)
    return latency_summary(latencies, time.perf_counter() - started)


async def append_run(ctx: ContextClient, factory: BlockFactory, size: int, appends: int) -> dict[str, Any]:
    """`appends` single-block appends, each to a session holding between `size` and 1.1 x `size` blocks."""
    per_session = max(1, size // 10)
    latencies: list[float] = []
    active_s = 0.0
    while len(latencies) < appends:
        session_id = await build_session(ctx, factory, size)
        started = time.perf_counter()
        for _ in range(min(per_session, appends - len(latencies))):
            block = factory.next()
            t0 = time.perf_counter()
            reply = await ctx.append(session_id, [block])
            latencies.append(time.perf_counter() - t0)
            assert len(reply.block_ids) == 1 and not reply.pruned, reply
        active_s += time.perf_counter() - started
        await ctx.delete(session_id)
    return {**latency_summary(latencies, active_s), "sessions_built": -(-appends // per_session)}


def median_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure over the runs, and every run's p50/p99 (this machine is noisy)."""
    keys = ("ops_per_s", "p50_ms", "p99_ms", "mean_ms")
    merged: dict[str, Any] = {key: round(statistics.median(run[key] for run in runs), 3) for key in keys}
    merged["ops"] = runs[0]["ops"]
    merged["runs_p50_ms"] = [run["p50_ms"] for run in runs]
    merged["runs_p99_ms"] = [run["p99_ms"] for run in runs]
    return merged


class Steps:
    """Wall-clock samples of named steps."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {}

    @contextmanager
    def clock(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.samples.setdefault(name, []).append(time.perf_counter() - started)

    def medians_ms(self) -> dict[str, float]:
        return {f"{name}_ms": round(statistics.median(samples) * 1000, 3) for name, samples in self.samples.items()}


async def breakdown(store: SessionStore, redis_url: str, prefix: str, session_id: str,
                    settings: RenderSettings) -> dict[str, Any]:
    """Where one render (and one get) spends its time, each step timed directly (medians)."""
    redis = redis_client(redis_url, decode=False)
    base = f"{prefix}:ctx:s:{session_id}"
    steps = Steps()
    try:
        await redis.config_resetstat()
        for _ in range(BREAKDOWN_ROUNDS):
            with steps.clock("redis_read"):  # what SessionStore.read asks Redis for, bytes only
                async with redis.pipeline(transaction=True) as pipe:
                    pipe.hgetall(f"{base}:meta")
                    pipe.hgetall(f"{base}:blocks")
                    pipe.zrange(f"{base}:order", 0, -1)
                    _, raw_blocks, order = await pipe.execute()
            with steps.clock("msgpack_decode"):
                decoded = [msgpack.unpackb(raw_blocks[block_id], raw=False) for block_id in order]
            with steps.clock("pydantic_validate"):
                blocks = [Block.model_validate(data) for data in decoded]
            with steps.clock("store_read_total"):
                session = await store.read(session_id, ttl_ms=86_400_000)
            assert session is not None and len(session.blocks) == len(blocks)
            with steps.clock("select"):
                chosen = _choose(blocks, {block.id: segment_tokens(block) for block in blocks}, settings)
            with steps.clock("render_function_total"):
                rendered = render(blocks, settings)
            with steps.clock("final_token_count"):
                count_tokens(rendered.text)
            assert set(rendered.included) <= chosen
            with steps.clock("render_reply_pack"):
                pack(RenderReply(session_id=session_id, version=session.version, text=rendered.text,
                                 tokens=rendered.tokens, budget_tokens=settings.budget_tokens,
                                 included=rendered.included, omitted=rendered.omitted))
            with steps.clock("get_reply_pack"):
                packed = pack(SessionReply(session=session))
            with steps.clock("get_reply_unpack_client"):
                unpack(SessionReply, packed)
        stats = await redis.info("commandstats")
    finally:
        await redis.aclose()
    report: dict[str, Any] = steps.medians_ms()
    # Both reads per round (the raw pipeline and store.read) run HGETALL x2 and ZRANGE on the server.
    server_us = sum(stats.get(f"cmdstat_{name}", {}).get("usec", 0) for name in ("hgetall", "zrange"))
    report["redis_server_read_ms"] = round(server_us / (2 * BREAKDOWN_ROUNDS) / 1000, 3)
    report.update({"rounds": BREAKDOWN_ROUNDS, "blocks": len(blocks), "raw_bytes": sum(map(len, raw_blocks.values())),
                   "get_reply_bytes": len(packed), "render_text_tokens": rendered.tokens,
                   "render_included_blocks": len(rendered.included),
                   "blocks_dropped_after_the_real_count": len(chosen) - len(rendered.included)})
    return report


async def append_breakdown(ops: ContextOperations, redis_url: str, factory: BlockFactory, session_id: str
                           ) -> dict[str, Any]:
    """Where one append spends its time, without the bus (the session grows by 2 x rounds blocks)."""
    redis = redis_client(redis_url, decode=False)
    limits = Limits(ttl_ms=int(ops.config.ttl_s * 1000), max_blocks=ops.config.max_blocks,
                    max_bytes=ops.config.max_session_bytes)
    steps = Steps()
    try:
        await redis.config_resetstat()
        for _ in range(BREAKDOWN_ROUNDS):
            new = factory.next()
            with steps.clock("count_tokens"):
                tokens = count_tokens(new.content)
            block = Block(id=new_call_id(), type=new.type, content=new.content, relevance=new.relevance,
                          metadata=new.metadata, timestamp_ms=now_ms(), token_count=tokens)
            with steps.clock("store_commit"):  # the Lua commit script, one round trip
                committed = await ops.store.commit(session_id, Change(add=[block]), None, now_ms(), limits)
            assert committed.status == "ok", committed
            with steps.clock("operation_total"):  # count + commit + the ctx.block_added event (JetStream ack)
                await ops.append(AppendBlocks(session_id=session_id, blocks=[factory.next()]))
        stats = await redis.info("commandstats")
    finally:
        await redis.aclose()
    script = stats.get("cmdstat_evalsha", {})
    return {**steps.medians_ms(), "redis_server_commit_ms": round(script.get("usec_per_call", 0) / 1000, 3),
            "rounds": BREAKDOWN_ROUNDS}


async def measure_size(ctx: ContextClient, service: ContextService, *, redis_url: str, prefix: str,
                       size: int, ops: int) -> dict[str, Any]:
    factory = BlockFactory(seed=size)
    session_id = await build_session(ctx, factory, size)
    session = await ctx.get(session_id)
    runs: dict[str, list[dict[str, Any]]] = {"append": [], "render": [], "get": []}
    for _ in range(REPEATS):
        runs["append"].append(await append_run(ctx, factory, size, ops))
        runs["render"].append(await timed_loop(lambda: ctx.render(session_id, BUDGET_TOKENS), ops))
        runs["get"].append(await timed_loop(lambda: ctx.get(session_id), ops))
    rendered = await ctx.render(session_id, BUDGET_TOKENS)
    assert service.ops is not None
    settings = RenderSettings(budget_tokens=BUDGET_TOKENS, recent_share=service.ops.config.recent_share,
                              min_relevance=service.ops.config.min_relevance)
    split = await breakdown(service.ops.store, redis_url, prefix, session_id, settings)
    append_split = await append_breakdown(service.ops, redis_url, factory, session_id)
    await ctx.delete(session_id)
    return {
        "blocks": size,
        "session_tokens": session.metrics.total_tokens,
        "mean_block_tokens": round(session.metrics.total_tokens / size, 1),
        "type_distribution": session.metrics.type_distribution,
        "render_tokens": rendered.tokens,
        "render_included_blocks": len(rendered.included),
        **{verb: median_runs(verb_runs) for verb, verb_runs in runs.items()},
        "append_sessions_built_per_run": runs["append"][0]["sessions_built"],
        "breakdown": split,
        "append_breakdown": append_split,
    }


def growth(sizes: list[dict[str, Any]]) -> dict[str, Any]:
    """p50 ratios between sizes, and the marginal p50 cost per block from the smallest to the largest."""
    first, last = sizes[0], sizes[-1]
    report: dict[str, Any] = {}
    for verb in ("append", "render", "get"):
        report[verb] = {
            **{f"p50_x_{b['blocks']}_vs_{a['blocks']}": round(b[verb]["p50_ms"] / a[verb]["p50_ms"], 2)
               for a, b in itertools.pairwise(sizes)},
            f"p50_x_{last['blocks']}_vs_{first['blocks']}": round(last[verb]["p50_ms"] / first[verb]["p50_ms"], 2),
            "p50_us_per_extra_block": round((last[verb]["p50_ms"] - first[verb]["p50_ms"]) * 1000
                                            / (last["blocks"] - first["blocks"]), 2),
        }
    return report


async def main(ops: int) -> dict[str, Any]:
    config = bench_config()
    started, load_before = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="toolbus-bench-") as tmp:
        nats_server = NatsServer(NatsServerSettings(data_dir=Path(tmp) / "nats"))
        redis_server = RedisServer(RedisServerSettings(data_dir=Path(tmp) / "redis"))
        nats_url, redis_url = nats_server.start(), redis_server.start()
        try:
            await bootstrap(nats_url, config)
            service = ContextService(ContextSettings(nats_url, config.prefix, "context-bench", redis_url))
            await service.start()
            nc = await nats.connect(nats_url)
            try:
                ctx = ContextClient(nc, Subjects(config.prefix), timeout_s=30)
                warm = BlockFactory(seed=0)  # warm-up: tokenizer, Lua scripts, connections
                warm_id = await build_session(ctx, warm, 50)
                for _ in range(20):
                    await ctx.append(warm_id, [warm.next()])
                    await ctx.render(warm_id, BUDGET_TOKENS)
                    await ctx.get(warm_id)
                await ctx.delete(warm_id)
                sizes = [await measure_size(ctx, service, redis_url=redis_url, prefix=config.prefix,
                                                size=size, ops=ops) for size in SIZES]
            finally:
                await nc.close()
                await service.stop()
        finally:
            nats_server.stop()
            redis_server.stop()
    return {"benchmark": "context store", "machine": f"{platform.machine()} {platform.processor()}",
            "cores": os.cpu_count(), "python": platform.python_version(),
            "setup": "embedded nats-server and redis-server (AOF, fsync everysec, as `toolbus up`); one "
                     "ContextService in the bench process, sharing its event loop with the SDK client; "
                     "one request at a time",
            "budget_tokens": BUDGET_TOKENS, "repeats": REPEATS, "ops_per_run": ops, "sizes": sizes,
            "growth": growth(sizes), "seconds": round(time.perf_counter() - started, 1),
            "load_average_1_5_15_min": {"before": [round(x, 2) for x in load_before],
                                        "after": [round(x, 2) for x in os.getloadavg()]},
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def print_report(result: dict[str, Any]) -> None:
    print(f"context store, one request at a time, render budget {result['budget_tokens']} tokens "
          f"(p50 / p99 ms, median of {result['repeats']} runs of {result['ops_per_run']} ops)")
    print(f"{'blocks':>7} {'tokens':>8}  {'append p50/p99':>16}  {'render p50/p99':>16}  {'get p50/p99':>16}")
    for size in result["sizes"]:
        cells = [f"{size[verb]['p50_ms']:>7.2f} /{size[verb]['p99_ms']:>7.2f}" for verb in ("append", "render", "get")]
        print(f"{size['blocks']:>7} {size['session_tokens']:>8}  " + "  ".join(f"{cell:>16}" for cell in cells))
    for verb, ratios in result["growth"].items():
        print(f"growth, {verb:>6}: " + ", ".join(f"{key} {value}" for key, value in ratios.items()))
    split = result["sizes"][-1]["breakdown"]
    print(f"render of {split['blocks']} blocks, direct timings (median ms): "
          + ", ".join(f"{key[:-3]} {value}" for key, value in split.items() if key.endswith("_ms")))
    split = result["sizes"][-1]["append_breakdown"]
    print(f"append to {result['sizes'][-1]['blocks']} blocks, direct timings (median ms): "
          + ", ".join(f"{key[:-3]} {value}" for key, value in split.items() if key.endswith("_ms")))
    print(f"load average before {result['load_average_1_5_15_min']['before']}, "
          f"after {result['load_average_1_5_15_min']['after']}")
    print(f"took {result['seconds']} s; written to {RESULTS}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ops", type=int, default=500, help="appends, renders and gets per run and size")
    args = parser.parse_args()
    report = asyncio.run(main(args.ops))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
