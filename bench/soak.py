"""A long run at capacity: every session slot busy for --minutes, on loopback, with what real use does to a server.

    python bench/soak.py --minutes 60 --size 256 --bots 2 --out bench/results/soak-cpu-60min.json

Load (all against one `emo-stream serve` process on 127.0.0.1, its slots = bots + 1):
  - bots: WebSocket API sessions with JPEG frames back; each speaks utterances in real time (20 ms messages:
    espeak speech, or beeps) with 0.5-3 s pauses, interrupts every 5th utterance halfway (clear), and drops its
    connection and comes back every --reconnect-minutes (staggered);
  - a WebRTC session in real Chromium (the talk page, the fake mic looping beeps and pauses), stopped and
    started again every --reconnect-minutes, watched by a second Chromium page on the OBS viewer (/viewer);
  - an aiortc WebRTC viewer on the latest session, re-attached every 5 minutes;
  - every 10 minutes one more bot asks for a session: it must be told the server is busy.

Recorded: the server's RSS every 10 s and its slope (MiB per hour, after the first 5 minutes), frame rate per
session and per minute, frame gaps, A/V offset by the synctest pattern (WebSocket: each utterance; browser
talk and viewer pages: each minute), the lag of each frame's arrival behind its pts and its drift (ms per
minute), errors (server log lines at ERROR or with a traceback, error events, client exceptions), the load
average every 10 s (the machine may be shared: frame-rate dips can come from other work), and the command.
Bounded: a hard limit of --minutes + 5.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import io
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from _common import REPO, device_name, emit_json, rss_mb  # bench/; puts the repo on sys.path
from av_sync import BROWSER_ARGS, CHROMIUM, INIT_SCRIPT, beeps_wav, heard_at
from emo_stream.families.synctest.measure import beeps, burst_offsets, offsets_of_frames

FPS = 25


def speech_clips() -> list[np.ndarray]:
    """A few utterances: espeak-ng sentences where it is installed, and beeps (the synctest pattern's sharpest
    input) either way."""
    clips = [beeps(2.4, every_s=0.8), beeps(1.6, every_s=0.7, first_s=0.11)]
    from emo_stream.media import load_audio

    for text in ("Thanks for calling. Let me check that for you, it will only take a moment.",
                 "Your order left the warehouse this morning and should arrive on Thursday."):
        try:
            with tempfile.TemporaryDirectory() as tmp:
                wav = Path(tmp) / "s.wav"
                subprocess.run(["espeak-ng", "-s", "160", "-w", str(wav), text], check=True, capture_output=True)
                clips.append(load_audio(wav))
        except (OSError, subprocess.CalledProcessError):
            pass
    return clips


class Server:
    """`emo-stream serve` in its own process; its log is scanned for errors as it runs."""

    def __init__(self, args, tmp: Path) -> None:
        cfg = tmp / "server.yaml"
        cfg.write_text("engine:\n  vad: false\n" if args.backend == "synctest" else "{}\n")
        self.cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", "0",
                    "--backend", args.backend, "--size", str(args.size), "--max-sessions", str(args.bots + 1),
                    "--config", str(cfg)]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        if args.diagnostics:   # server/diagnostics.py: memory/GC/loop records as JSON lines (costs CPU)
            env["EMO_STREAM_DIAGNOSTICS"] = args.diagnostics
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env)
        self.errors: list[str] = []
        self.error_lines = 0
        self.warnings = 0
        self.url = None
        t0 = time.monotonic()
        head = []
        while time.monotonic() - t0 < 120:
            line = self.proc.stdout.readline()
            if not line:
                break
            head.append(line)
            found = re.search(r"http://[0-9.:]+", line)
            if found and "serving" in line:
                self.url = found.group(0)
                break
        if self.url is None:
            self.proc.kill()
            raise SystemExit("the server did not start:\n" + "".join(head[-20:]))
        threading.Thread(target=self._scan, daemon=True).start()

    def _scan(self) -> None:
        trace: list[str] | None = None   # a traceback being read: kept whole, to its exception line
        for line in self.proc.stdout:
            if trace is not None:
                trace.append(line.rstrip()[:300])
                if not line.startswith((" ", "\t", "Traceback", "During handling", "The above exception")) \
                        and line.strip():
                    if len(self.errors) < 30:
                        self.errors.append(" | ".join(trace[-8:]))
                    trace = None
                continue
            if line.startswith("Traceback"):
                trace = [line.rstrip()]
                continue
            if " ERROR " in line or " CRITICAL " in line:
                self.error_lines += 1
                if len(self.errors) < 30:
                    self.errors.append(line.rstrip()[:300])
            elif " WARNING " in line:
                self.warnings += 1

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Tally:
    """Everything the clients saw, kept small (per-minute counts, per-connection summaries)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.errors: list[str] = []
        self.error_count = 0
        self.connections: list[dict] = []
        self.utterances = 0
        self.interrupts = 0
        self.reconnects = 0
        self.busy_ok = 0
        self.busy_retries = 0      # a reconnecting client told "busy" while its old slot was being freed
        self.busy_wrong: list[str] = []
        self.ws_offsets_ms: list[float] = []
        self.browser: list[dict] = []
        self.viewers: list[dict] = []
        self.loop_lag_ms: dict[int, float] = {}   # per minute: this process's worst event-loop stall
        self.stalls: list[tuple[float, float]] = []   # this loop's stalls over 100 ms (perf_counter start, end)

    def minute(self) -> int:
        return int((time.monotonic() - self.t0) // 60)

    def error(self, where: str, exc: BaseException | str) -> None:
        self.error_count += 1
        if len(self.errors) < 50:
            self.errors.append(f"{round(time.monotonic() - self.t0)} s {where}: {exc}")


class _Frame:   # what offsets_of_frames reads
    __slots__ = ("pts", "image", "audio")

    def __init__(self, pts, image, audio):
        self.pts, self.image, self.audio = pts, image, audio


async def bot(n: int, url: str, clips: list[np.ndarray], until: float, args, tally: Tally) -> None:
    from server.bot_client import BotClient, ReceivedFrame

    rng = random.Random(n)
    first_life = args.reconnect_minutes * 60 * (n + 1) / (args.bots + 1)   # staggered
    life = first_life
    while time.monotonic() < until:
        conn = {"bot": n, "started_s": round(time.monotonic() - tally.t0, 1), "frames": 0, "speech_frames": 0,
                "per_minute": {}, "max_gap_ms": 0.0, "gaps": [], "lags": [], "errors": 0, "reply_ms": [],
                "consumer_delay_ms_max": 0.0}
        end = min(until, time.monotonic() + life)
        life = args.reconnect_minutes * 60
        try:
            async with BotClient(url, decode=False) as client:
                await _start_retrying(client, tally, n)
                utter: list[_Frame] = []
                said: collections.deque[float] = collections.deque()   # each utterance's first send
                busy_speaking = asyncio.Event()

                async def speak() -> None:
                    k = 0
                    while time.monotonic() < end:
                        clip = clips[k % len(clips)]
                        interrupt = k % 5 == 4
                        stop_at = len(clip) // 2 if interrupt else len(clip)
                        busy_speaking.set()
                        due = time.monotonic()   # real time on an absolute clock (relative sleeps oversleep)
                        said.append(due)
                        for i in range(0, stop_at, 320):
                            await client.send_audio(clip[i:i + 320])
                            due += 0.02
                            await asyncio.sleep(max(0.0, due - time.monotonic()))
                        if interrupt:
                            await client.clear()
                            tally.interrupts += 1
                        else:
                            await client.end_segment()
                        tally.utterances += 1
                        k += 1
                        await asyncio.sleep(rng.uniform(0.5, 3.0))

                sender = asyncio.create_task(speak())
                t_first = last = None
                in_speech = False
                try:
                    async for item in client.receive(timeout=15):
                        now = time.monotonic()
                        if now >= end:
                            break
                        if isinstance(item, ReceivedFrame):
                            # timed when it came off the socket: receive() hands frames out later when this loop
                            # (shared with the other bots, the browser driver and the analysis) falls behind
                            at = item.received_at or now
                            conn["consumer_delay_ms_max"] = max(conn["consumer_delay_ms_max"], 1000 * (now - at))
                            conn["frames"] += 1
                            m = int((at - tally.t0) // 60)
                            conn["per_minute"][m] = conn["per_minute"].get(m, 0) + 1
                            if last is not None:
                                conn["max_gap_ms"] = max(conn["max_gap_ms"], 1000 * (at - last))
                                if at - last > 0.2:   # kept to compare with this process's own stalls
                                    conn["gaps"] = sorted(conn["gaps"] + [(at - last, last, at)])[-5:]
                            last = at
                            if t_first is None:
                                t_first = at - item.pts
                            if item.index % 25 == 0:
                                conn["lags"].append((at - tally.t0, 1000 * (at - t_first - item.pts)))
                            if item.speech and not in_speech:
                                # an utterance's first frame: how long after its first audio went out (the
                                # latency a caller hears; unlike arrival lag, a pause of the timeline is no part)
                                while said and said[0] <= at:
                                    start = said.popleft()
                                    if not said or said[0] > at:
                                        conn["reply_ms"].append((at - tally.t0, 1000 * (at - start)))
                            in_speech = item.speech
                            if item.speech:
                                conn["speech_frames"] += 1
                                if args.backend == "synctest":
                                    # decoded off the loop: a busy loop delays every bot's reading
                                    utter.append(_Frame(item.pts, await asyncio.to_thread(_level_image, item.jpeg),
                                                        item.audio))
                        elif item.get("type") == "playback_finished":
                            if utter and not item.get("interrupted"):
                                found = await asyncio.to_thread(offsets_of_frames, utter, FPS)
                                tally.ws_offsets_ms.extend(1000 * o.offset for o in found if o.score > 0.8)
                            utter = []
                        elif item.get("type") == "error":
                            conn["errors"] += 1
                            tally.error(f"bot {n} error event", item.get("message"))
                finally:
                    sender.cancel()
                    results = await asyncio.gather(sender, return_exceptions=True)
                    if results and isinstance(results[0], Exception):
                        tally.error(f"bot {n} sender", repr(results[0]))
                with contextlib.suppress(Exception):   # the server's view of this session: did its playout stall?
                    conn["server"] = _server_figures(await client.request({"type": "stats"}, timeout=5))
                await client.stop()
                with contextlib.suppress(Exception):   # a polite client waits for its slot to be given back
                    async for item in client.receive(timeout=5):
                        if isinstance(item, dict) and item.get("type") == "session_ended":
                            break
        except Exception as exc:
            conn["errors"] += 1
            tally.error(f"bot {n}", repr(exc))
            await asyncio.sleep(1.0)
        conn["ended_s"] = round(time.monotonic() - tally.t0, 1)
        tally.connections.append(_summarise(conn, tally))
        tally.reconnects += 1


async def _start_retrying(client, tally: Tally, n: int) -> None:
    """start, and on a busy reply (a slot given back a moment ago may still be closing) try again for 10 s."""
    from server.bot_client import BotError

    for attempt in range(20):
        try:
            await client.start(sample_rate=16000, frames="jpeg")
            return
        except BotError as exc:
            if exc.code != "busy" or attempt == 19:
                raise
            tally.busy_retries += 1
            await asyncio.sleep(0.5)


def _diagnostics(spec: str | None) -> list[dict] | None:
    """The server's --diagnostics records, kept to what explains memory and stalls."""
    if not spec:
        return None
    path = Path(spec.rpartition(":")[0] if re.search(r":[0-9.]+$", spec) else spec)
    keep = ("t_s", "rss_mib", "heap_mib", "gc_objects", "gc_frozen", "gc_unreachable_found", "walk_ms", "loop_worst_lag_ms",
            "gc_pauses", "sweeps", "threads", "closed_sessions_alive", "closed_session_held_by")
    out = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            w = r.get("watched", {})
            out.append({**{k: r[k] for k in keep if k in r}, "sessions": w.get("ServerSession", 0),
                        "peer_connections": w.get("RTCPeerConnection", 0), "tasks": sum(r.get("tasks", {}).values())})
    return out


def _autogroup() -> str | None:
    """The scheduler group this run had (`/autogroup-N nice K`): a timing run gets its own at high priority."""
    try:
        return Path("/proc/self/autogroup").read_text().strip()
    except OSError:
        return None


def _server_figures(stats: dict) -> dict:
    """What the server says of a session: its playout's stalls (re-anchors push every later frame back),
    the idle frames it left out to win that back, and frames dropped for this client."""
    playout = stats.get("playout") or {}
    keep = ("frames", "late_frames", "reanchors", "behind_ms", "skipped_idle_frames", "subscriber_drops")
    return {**{f"playout_{k}": playout.get(k) for k in keep}, "engine_late_frames": stats.get("late_frames"),
            "engine_dropped_frames": stats.get("dropped_frames"), "ws_frames_dropped": stats.get("frames_dropped"),
            "engine_fps": stats.get("fps")}


def _level_image(jpeg: bytes) -> np.ndarray:
    """A frame reduced to what offsets_of_frames reads (read_pattern on a 1/8 scale grey decode)."""
    from PIL import Image

    im = Image.open(io.BytesIO(jpeg))
    im.draft("L", (im.width // 8, im.height // 8))
    return np.asarray(im.convert("L"))


def _span(values: list) -> dict | None:
    values = [v for v in values if v is not None]
    return {"min": min(values), "max": max(values)} if values else None


def _stalled(stalls: list[tuple[float, float]], t0: float, t1: float) -> float:
    """Seconds of [t0, t1] during which this process's loop was stalled."""
    return sum(max(0.0, min(b, t1) - max(a, t0)) for a, b in stalls)


def _summarise(conn: dict, tally: Tally) -> dict:
    lags = conn.pop("lags")
    minutes = sorted(conn["per_minute"].items())
    full = [c / 60 for m, c in minutes[1:-1]]        # whole minutes only
    conn["fps_per_minute_min"] = round(min(full), 2) if full else None
    conn["fps_per_minute_median"] = round(statistics.median(full), 2) if full else None
    span = conn["ended_s"] - conn["started_s"]
    conn["fps_mean"] = round(conn["frames"] / span, 2) if span > 0 else None
    conn["per_minute"] = {str(m): c for m, c in minutes}
    conn["max_gap_ms"] = round(conn["max_gap_ms"], 1)
    # the largest gaps, each with how much of it this (client) process's loop was stalled: a gap the client
    # made itself is not the server's
    conn["largest_gaps"] = [{"at_s": round(at - tally.t0, 1), "gap_ms": round(1000 * g, 1),
                             "client_stalled_ms": round(1000 * _stalled(tally.stalls, t0, at), 1)}
                            for g, t0, at in sorted(conn.pop("gaps"), reverse=True)]
    conn["consumer_delay_ms_max"] = round(conn["consumer_delay_ms_max"], 1)
    reply = conn.pop("reply_ms")
    if len(reply) > 5:
        t = np.array([a for a, _ in reply]) / 60
        ms = np.array([b for _, b in reply])
        conn["reply_ms"] = {"n": len(ms), "p50": round(float(np.median(ms)), 1),
                            "p95": round(float(np.percentile(ms, 95)), 1), "max": round(float(ms.max()), 1),
                            "drift_ms_per_min": round(float(np.polyfit(t, ms, 1)[0]), 3) if np.ptp(t) > 1 else None}
    if len(lags) > 10:
        t = np.array([a for a, _ in lags]) / 60
        lag = np.array([b for _, b in lags])
        conn["arrival_lag_ms_p50"] = round(float(np.median(lag)), 1)
        conn["arrival_lag_ms_p95"] = round(float(np.percentile(lag, 95)), 1)
        conn["arrival_lag_drift_ms_per_min"] = round(float(np.polyfit(t, lag, 1)[0]), 3)
    return conn


async def loop_watch(until: float, tally: Tally) -> None:
    """How late a 20 ms sleep wakes in this (client) process: its stalls delay every bot's reading and sending."""
    while time.monotonic() < until:
        t = time.perf_counter()
        await asyncio.sleep(0.02)
        late = 1000 * (time.perf_counter() - t - 0.02)
        m = tally.minute()
        tally.loop_lag_ms[m] = round(max(tally.loop_lag_ms.get(m, 0.0), late), 1)
        if late > 100 and len(tally.stalls) < 20000:
            end = time.monotonic()   # the clock of BotClient's received_at
            tally.stalls.append((end - late / 1000 - 0.02, end))


async def busy_probe(url: str, until: float, tally: Tally) -> None:
    """Every 10 minutes one session too many: it must get the busy reply, and nobody else may notice."""
    from server.bot_client import BotClient, BotError

    while True:
        await asyncio.sleep(max(0.0, min(600.0, until - 30 - time.monotonic())))
        if time.monotonic() >= until - 30:
            return
        try:
            async with BotClient(url) as extra:
                await extra.start(frames="none")
                tally.busy_wrong.append(f"{tally.minute()} min: a session beyond capacity was accepted")
                await extra.stop()
        except BotError as exc:
            if exc.code == "busy" or "busy" in str(exc):
                tally.busy_ok += 1
            else:
                tally.busy_wrong.append(f"{tally.minute()} min: {exc.code}: {exc}")
        except Exception as exc:
            tally.error("busy probe", repr(exc))


async def aiortc_viewers(url: str, until: float, tally: Tally) -> None:
    from server_load import webrtc_viewer

    while time.monotonic() < until - 20:
        seconds = min(300.0, until - time.monotonic() - 10)
        try:
            got = await webrtc_viewer(url, seconds)
            tally.viewers.append({"at_min": tally.minute(), **got})
        except Exception as exc:
            tally.error("aiortc viewer", repr(exc))
            await asyncio.sleep(2)


def _browser_offsets(avs: dict, to_perf: float) -> tuple[list[float], float | None, int]:
    env = np.asarray(avs["env"], float).reshape(-1, 2)
    frames = np.asarray(avs["frames"], float).reshape(-1, 4)
    if len(env) < 10 or len(frames) < 10:
        return [], None, len(frames)
    et = heard_at(env[:, 0], avs.get("map") or [], to_perf)
    ft = frames[:, 0] / 1000
    found = burst_offsets(ft, frames[:, 1], et, env[:, 1], 1 / FPS)
    fps = (len(ft) - 1) / (ft[-1] - ft[0]) if ft[-1] > ft[0] else None
    return [1000 * o.offset for o in found if o.score > 0.8], fps, len(frames)


async def browser(url: str, wav: Path, until: float, args, tally: Tally) -> None:
    """The talk page's WebRTC session (fake mic) and an OBS viewer page on it; stop/start every reconnect."""
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS + [f"--use-file-for-fake-audio-capture={wav}"])
        context = await b.new_context(permissions=["microphone"], bypass_csp=True)
        await context.add_init_script(INIT_SCRIPT)
        vcontext = await b.new_context(bypass_csp=True)
        await vcontext.add_init_script(INIT_SCRIPT)
        page = await context.new_page()
        page.on("pageerror", lambda e: tally.error("talk page", e))
        await page.goto(url + "/")
        await page.evaluate("window.__watchPattern(document.getElementById('avatar'))")
        vpage = None
        session_started = 0
        while time.monotonic() < until - 15:
            try:
                # the page's frame count runs on across its sessions: wait for 10 frames of this one and its sound
                # track (tapped before that track exists, the envelope stays silent: no talk offsets after a restart)
                shown = await page.evaluate("window.emo.frames")
                await page.click("button#start")
                await page.wait_for_function(
                    "(n) => window.emo.state === 'live' && window.emo.frames > n + 10 && "
                    "document.getElementById('avatar').srcObject && "
                    "document.getElementById('avatar').srcObject.getAudioTracks().length > 0", arg=shown, timeout=60000)
                session_started += 1
                await page.evaluate("window.__tapEnvelope(document.getElementById('avatar').srcObject)")
                session = await page.evaluate("window.emo.session || 'latest'")
                if vpage is not None:
                    await vpage.close()
                vpage = await vcontext.new_page()   # its own window: a second tab would hide the talk page
                vpage.on("pageerror", lambda e: tally.error("viewer page", e))
                await vpage.goto(f"{url}/viewer?session={session}")
                await vpage.evaluate("window.__watchPattern(document.getElementById('avatar'))")
                await vpage.wait_for_function("() => window.emo && window.emo.frames > 10", timeout=60000)
                await vpage.evaluate("window.__tapEnvelope(document.getElementById('avatar').srcObject)")
                end = min(until - 10, time.monotonic() + args.reconnect_minutes * 60)
                for pg in (page, vpage):
                    await pg.evaluate("window.__avs.frames = []; window.__avs.env = []; window.__avs.rx = []")
                while time.monotonic() < end:
                    await asyncio.sleep(min(60.0, max(1.0, end - time.monotonic())))
                    row = {"at_min": tally.minute()}
                    for name, pg in (("talk", page), ("viewer", vpage)):
                        avs = await pg.evaluate("(() => { const a = window.__avs; const out = {frames: a.frames, env: a.env,"
                                                " map: window.__clockMap}; a.frames = []; a.env = []; a.rx = [];"
                                                " window.__clockMap = window.__clockMap.slice(-2); return out; })()")
                        to_perf = await pg.evaluate("window.__ctxToPerf()")
                        offs, fps, n = await asyncio.to_thread(_browser_offsets, avs, to_perf)
                        row[name] = {"fps_shown": round(fps, 2) if fps else None, "frames": n,
                                     "offset_ms_median": round(statistics.median(offs), 1) if offs else None,
                                     "offsets": len(offs)}
                    stats = await page.evaluate("window.emo.stats") or {}
                    row["server"] = {"fps": stats.get("fps"), "latency_ms_p95": (stats.get("latency_ms") or {}).get("p95"),
                                     "av_offset_ms": (stats.get("playout") or {}).get("av_offset_ms")}
                    row["state"] = await page.evaluate("window.emo.state")
                    tally.browser.append(row)
                    if row["state"] != "live":   # the page says why (session_ended reason / error)
                        said = await page.evaluate("(document.getElementById('notice') || {}).textContent + ' | ' + "
                                                   "(document.getElementById('error') || {}).textContent")
                        tally.error("talk page", f"state {row['state']}: {said}")
                        break
                if await page.evaluate("window.emo.state") == "live":
                    await page.click("button#stop")
                tally.reconnects += 1
                await asyncio.sleep(2.0)
            except Exception as exc:
                tally.error("browser", repr(exc).splitlines()[0][:300])
                try:
                    await page.click("button#stop", timeout=5000)
                except Exception:
                    pass
                await asyncio.sleep(5.0)
        await vcontext.close()
        await context.close()
        await b.close()


def sampler(pid: int, t0: float, stop: threading.Event, out: dict) -> None:
    while not stop.wait(10.0):
        t = round(time.monotonic() - t0, 1)
        out["rss"].append((t, round(rss_mb(pid), 1)))
        out["load"].append((t, *[round(x, 2) for x in os.getloadavg()]))
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out["cpu"].append((t, round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 1)))
        except OSError:
            pass


async def run(args, server: Server, wav: Path, tally: Tally) -> None:
    until = time.monotonic() + args.minutes * 60
    clips = speech_clips()
    tasks = [asyncio.create_task(bot(n, server.url, clips, until, args, tally)) for n in range(args.bots)]
    if args.browser:
        tasks.append(asyncio.create_task(browser(server.url, wav, until, args, tally)))
    await asyncio.sleep(3.0)
    if args.viewers:
        tasks.append(asyncio.create_task(aiortc_viewers(server.url, until, tally)))
    tasks.append(asyncio.create_task(busy_probe(server.url, until, tally)))
    tasks.append(asyncio.create_task(loop_watch(until, tally)))
    # every task ends by itself at `until`; one that does not within 2 minutes more is an error, and cancelled
    done, late = await asyncio.wait(tasks, timeout=until - time.monotonic() + 120)
    for t in late:
        tally.error("task", f"{t.get_coro().__name__} still running 2 minutes after the end: cancelled")
        t.cancel()
    await asyncio.gather(*late, return_exceptions=True)
    for t in done:
        if t.exception() is not None:
            tally.error("task", repr(t.exception()))


def _slope_per_hour(points: list, after_s: float) -> float | None:
    pts = [(t, v) for t, v in points if t >= after_s]
    if len(pts) < 5:
        return None
    t = np.array([a for a, _ in pts]) / 3600
    return round(float(np.polyfit(t, np.array([b for _, b in pts]), 1)[0]), 2)


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 2) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--backend", choices=("synctest", "preview"), default="synctest")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--bots", type=int, default=3, help="WebSocket sessions (slots = bots + 1 for the browser)")
    parser.add_argument("--no-browser", dest="browser", action="store_false", help="no Chromium session")
    parser.add_argument("--viewers", type=int, default=1, help="aiortc WebRTC viewers (0 or 1)")
    parser.add_argument("--reconnect-minutes", type=float, default=10.0)
    parser.add_argument("--out", default=None)
    parser.add_argument("--diagnostics", default=None, metavar="FILE[:SECONDS]",
                        help="the server writes memory/GC/loop-lag records to FILE (server/diagnostics.py)")
    args = parser.parse_args()
    if args.browser and not Path(CHROMIUM).exists():
        raise SystemExit(f"the browser session needs Debian chromium at {CHROMIUM} (or --no-browser)")
    limit = int(args.minutes * 60 + 600)   # last resort: the tasks are bounded themselves
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("soak: hard time limit")))
    signal.alarm(limit)
    tmp = Path(tempfile.mkdtemp(prefix="emo-soak-"))
    wav = tmp / "mic.wav"
    beeps_wav(wav)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    started_utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    server = Server(args, tmp)
    tally = Tally()
    samples: dict = {"rss": [], "load": [], "cpu": []}
    stop = threading.Event()
    threading.Thread(target=sampler, args=(server.proc.pid, tally.t0, stop, samples), daemon=True).start()
    try:
        asyncio.run(run(args, server, wav, tally))
    finally:
        stop.set()
        signal.alarm(0)
        rss_end = rss_mb(server.proc.pid)
        server.stop()
    wall = time.monotonic() - tally.t0
    cpu = samples["cpu"]
    conns = tally.connections
    fps_min = [c["fps_per_minute_min"] for c in conns if c.get("fps_per_minute_min") is not None]
    drifts = [c["arrival_lag_drift_ms_per_min"] for c in conns if "arrival_lag_drift_ms_per_min" in c]
    talk = [r["talk"]["offset_ms_median"] for r in tally.browser if r["talk"]["offset_ms_median"] is not None]
    view = [r["viewer"]["offset_ms_median"] for r in tally.browser if r["viewer"]["offset_ms_median"] is not None]
    ws = tally.ws_offsets_ms
    loads = [row[1] for row in samples["load"]]
    mean_fps = [c["fps_mean"] for c in conns if c.get("fps_mean")]
    result = {
        "bench": "soak",
        "device": device_name(detail=f"{os.cpu_count()} cores, SHARED: other engineers ran tests and builds on this "
                                     "box during the run (see load_average_samples)"),
        "code": commit, "started_utc": started_utc, "minutes": round(wall / 60, 2),
        "backend": args.backend, "size": args.size, "slots": args.bots + 1, "bots": args.bots,
        "browser_session": args.browser, "aiortc_viewers": args.viewers, "reconnect_minutes": args.reconnect_minutes,
        "summary": {
            "errors_server_log_lines": server.error_lines, "errors_clients": tally.error_count,
            "server_warnings": server.warnings,
            "rss_mb_start": samples["rss"][0][1] if samples["rss"] else None, "rss_mb_end": round(rss_end, 1),
            "rss_slope_mb_per_hour_after_5min": _slope_per_hour(samples["rss"], 300),
            "server_cpu_cores_mean": round((cpu[-1][1] - cpu[0][1]) / (cpu[-1][0] - cpu[0][0]), 2) if len(cpu) > 1 else None,
            "bot_fps_per_minute_min": min(fps_min) if fps_min else None,
            "bot_fps_per_minute_median_of_medians": _median([c.get("fps_per_minute_median") for c in conns]),
            "bot_fps_mean_per_connection": {"min": min(mean_fps), "max": max(mean_fps)} if mean_fps else None,
            "bot_max_frame_gap_ms": max((c["max_gap_ms"] for c in conns), default=None),
            "bot_max_frame_gap_less_client_stall_ms": max((g["gap_ms"] - g["client_stalled_ms"] for c in conns
                                                           for g in c.get("largest_gaps", [])), default=None),
            "bot_consumer_delay_ms_max": max((c["consumer_delay_ms_max"] for c in conns), default=None),
            "client_loop_worst_lag_ms": max(tally.loop_lag_ms.values(), default=None),
            "server_playout_reanchors": sum((c.get("server") or {}).get("playout_reanchors") or 0 for c in conns),
            "server_playout_behind_ms_max": max(((c.get("server") or {}).get("playout_behind_ms") or 0 for c in conns),
                                                default=None),
            "server_playout_skipped_idle_frames": sum((c.get("server") or {}).get("playout_skipped_idle_frames") or 0
                                                      for c in conns),
            "bot_reply_ms_p50_per_connection": [c["reply_ms"]["p50"] for c in conns if "reply_ms" in c],
            "bot_reply_drift_ms_per_min": _span([c["reply_ms"]["drift_ms_per_min"] for c in conns if "reply_ms" in c]),
            "bot_arrival_lag_drift_ms_per_min": _span(drifts),
            "ws_av_offset_ms": ({"utterance_bursts": len(ws), "median": round(statistics.median(ws), 1),
                                 "min": round(min(ws), 1), "max": round(max(ws), 1)} if ws else None),
            "browser_talk_av_offset_ms_per_minute": ({"minutes": len(talk), "median": statistics.median(talk),
                                                      "min": min(talk), "max": max(talk)} if talk else None),
            "browser_viewer_av_offset_ms_per_minute": ({"minutes": len(view), "median": statistics.median(view),
                                                        "min": min(view), "max": max(view)} if view else None),
            "browser_talk_fps_shown_min": min((r["talk"]["fps_shown"] for r in tally.browser
                                               if r["talk"]["fps_shown"]), default=None),
            "utterances": tally.utterances, "interrupts": tally.interrupts, "reconnects": tally.reconnects,
            "busy_replies_at_capacity": tally.busy_ok, "busy_retries_on_reconnect": tally.busy_retries, "busy_wrong": tally.busy_wrong,
            "load_average_1min": {"min": min(loads), "median": statistics.median(loads), "max": max(loads)} if loads else None,
        },
        "errors_server_log": server.errors, "errors_clients": tally.errors,
        "connections": conns, "browser_per_minute": tally.browser, "aiortc_viewers_detail": tally.viewers,
        "client_loop_worst_lag_ms_per_minute": tally.loop_lag_ms,
        "server_diagnostics": _diagnostics(args.diagnostics),
        "rss_mb_samples": samples["rss"], "load_average_samples": samples["load"], "server_cpu_s_samples": cpu,
        "server_command": " ".join(server.cmd[1:]),
        "command": (f"nice -n {os.nice(0)} " if os.nice(0) else "") + "python " + " ".join(sys.argv),
        "autogroup": _autogroup(),
        "method": "A/V offset by the synctest pattern (emo_stream/families/synctest/measure.py); WebSocket offsets per "
                  "finished utterance on the session clock; browser offsets per minute from displayed frames "
                  "(requestVideoFrameCallback) vs the avatar stream's sound (AudioWorklet). arrival lag = frame arrival "
                  "(off the socket, BotClient's received_at) minus its pts against the session's first frame; its drift "
                  "is the slope per connection; frame gaps are between arrivals too. consumer_delay: how much later "
                  "this process's loop handled a frame than it arrived. Frame arrivals are stamped in this process's "
                  "event loop too, so each connection's largest gaps carry how long that loop was stalled (a 20 ms "
                  "sleep waking >100 ms late) within them: gap less stall is what the server can have caused. "
                  "server_*: the server's own playout figures per connection (stats at its end): re-anchors after a "
                  "late frame push every later frame back (behind_ms), skipped idle frames win it back. reply_ms: from an "
                  "utterance's first audio sent to its first speech frame's arrival, per utterance; its drift is the "
                  "latency trend (arrival lag also grows by every pause of the session's timeline, e.g. when the "
                  "sender stalls, which is no added latency).",
    }
    emit_json(result, args.out)


if __name__ == "__main__":
    main()
