"""benchmarks/serve_load.py's burst against a real aiohttp server on loopback: what it counts (statuses, the 200s'
latencies, timeouts) and how its clients treat a 503 (at once, or after Retry-After with --burst-polite)."""

import asyncio
import sys
from pathlib import Path

import psutil
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # they import each other by name
import serve_load  # noqa: E402
from conftest import free_port  # noqa: E402

BODIES = [("png32", b'{"image_base64": "x"}')]


async def run_burst(handler, connections: int, seconds: float, timeout: float, polite: bool) -> serve_load.Burst:
    app = web.Application()
    app.router.add_post("/predict", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    result = serve_load.Burst("test", connections)
    try:
        await serve_load.burst(f"http://127.0.0.1:{port}/predict", BODIES, seconds, timeout, psutil.Process(), result,
                               polite)
    finally:
        await runner.cleanup()
    return result


def test_burst_counts_statuses_and_the_200s_latencies():
    calls = []

    async def every_other_refused(request):
        await request.read()
        calls.append(1)
        if len(calls) % 2:
            return web.json_response({"detail": "busy"}, status=503, headers={"Retry-After": "1"})
        await asyncio.sleep(0.01)
        return web.json_response({"class_index": 0})

    rude = asyncio.run(run_burst(every_other_refused, 4, 0.5, 2.0, polite=False))
    assert set(rude.statuses) == {200, 503} and rude.answers == len(calls) > 20
    assert len(rude.ok_latencies) == rude.statuses[200] and min(rude.ok_latencies) >= 0.01
    assert rude.timeouts == rude.errors == 0 and rude.goodput > 0 and rude.pct(99) >= 10

    calls.clear()  # clients that wait a second after each 503 send far fewer requests in half a second
    polite = asyncio.run(run_burst(every_other_refused, 4, 0.5, 2.0, polite=True))
    assert polite.statuses.get(503, 0) <= 4 + 1 and polite.answers < rude.answers / 3


def test_a_request_past_the_client_timeout_is_a_timeout_not_an_answer():
    async def stalls(request):
        await asyncio.sleep(1.0)
        return web.json_response({"class_index": 0})

    result = asyncio.run(run_burst(stalls, 3, 0.1, 0.3, polite=False))
    assert result.timeouts == 3 and result.answers == 0 and result.ok_latencies == []
    assert 0.3 <= result.seconds < 1.0


def test_each_level_and_burst_counts_its_median_round_and_every_rounds_errors(capsys):
    def level(server, requests_per_s, errors=0, rss=(10, 11, 12)):
        return serve_load.Result(server, 32, 1000 + errors, 1000 / requests_per_s, errors=errors,
                                 rss_start=rss[0], rss_end=rss[1], rss_peak=rss[2])

    def burst(server, goodput, timeouts=0):
        return serve_load.Burst(server, 1024, seconds=1.0, statuses={200: goodput}, timeouts=timeouts)

    rounds = [level("api", 700), level("api", 350, errors=3, rss=(20, 21, 99)), level("api", 900, rss=(30, 31, 32)),
              level("litserve", 500)]
    assert serve_load.median_of(rounds[:3], "rps").rps == 700
    assert serve_load.median_of(rounds[:2], "rps").rps == 350  # an even count: the slower middle round
    bursts = [burst("api", 600), burst("api", 400, timeouts=2), burst("api", 800), burst("litserve", 500)]
    assert serve_load.median_of(bursts[:3], "goodput").goodput == 600
    serve_load.print_targets([serve_load.median_of(rounds[:3], "rps"), rounds[3]],
                             [serve_load.median_of(bursts[:3], "goodput"), bursts[3]], rounds, bursts)
    out = capsys.readouterr().out
    assert "api errors: 3 over 3003 requests" in out
    # a process's growth: the last round's (each round starts the server again), the peak of all
    assert "api RSS: 30 MB after the first warm-up, 31 MB at the end (of the last round), peak 99 MB" in out
    assert "api / the best peer (litserve) = 1.40x" in out
    assert "api 600.0 200s/s, the best peer (litserve) 500.0 (target the most: met); timeouts 2, connection " \
           "errors 0 in 3 bursts (target none: MISSED)" in out
