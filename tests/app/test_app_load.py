"""A bounded load test over the real HTTP API (gradio_client on localhost): 10 concurrent sessions, each opens a
slide and asks 3 questions. No errors, every session sees only its own slide and questions (no cross-talk), and the
numbers (latency percentiles, throughput) are written to test-output/app/load_test_<sessions>x<questions>.json.
The 10 x 3 run is marked slow; a 3 x 2 run is in the default suite."""

from __future__ import annotations

import json
import re
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from slidechat.app.config import AppConfig
from slidechat.app.server import start_in_background
from slidechat.utils.io import read_jsonl



def _text(content) -> str:
    """Message content as text (Gradio 6 sends a list of typed parts)."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


@pytest.mark.parametrize("n_sessions,n_questions", [
    pytest.param(3, 2, id="3x2"),
    pytest.param(10, 3, id="10x3", marks=pytest.mark.slow),  # the full bounded load test (~1 min on 2 cores)
])
def test_concurrent_sessions_no_errors_no_cross_talk(n_sessions, n_questions, tiny_slide_assistant, synth_dataset,
                                                      tmp_path_factory, test_output):
    N_SESSIONS, N_QUESTIONS = n_sessions, n_questions
    from gradio_client import Client

    records = read_jsonl(synth_dataset / "truth.jsonl")
    examples = {f"example-{k}": synth_dataset / records[k]["path"] for k in (0, 1)}
    config = AppConfig(cache_dir=tmp_path_factory.mktemp("load_cache"), port=None, concurrency=2, max_new_tokens=8,
                       n_examples=0)
    url, demo, service = start_in_background(tiny_slide_assistant, config, examples)
    latencies: dict[str, list[float]] = {"open": [], "ask": []}
    errors: list[str] = []
    lock = threading.Lock()

    def one_session(i: int) -> dict:
        client = Client(url, verbose=False)
        label = f"example-{i % 2}"
        t0 = time.perf_counter()
        status, _image, facts, *_ = client.predict(label, None, True, 0.45, api_name="/open_example")
        with lock:
            latencies["open"].append(time.perf_counter() - t0)
        if "Opened" not in status:
            raise AssertionError(f"session {i}: {status}")
        history = None
        for j in range(N_QUESTIONS):
            t0 = time.perf_counter()
            history, _q, _img, status, _dl, *_ = client.predict(f"[s{i}-q{j}] Which tissue types are present?", True,
                                                            0.45, "", api_name="/ask")
            with lock:
                latencies["ask"].append(time.perf_counter() - t0)
            if "Answered" not in status:
                raise AssertionError(f"session {i} question {j}: {status}")
        return {"i": i, "label": label, "facts": facts, "history": history, "client": client}

    t_start = time.perf_counter()
    with ThreadPoolExecutor(N_SESSIONS) as pool:
        futures = [pool.submit(one_session, i) for i in range(N_SESSIONS)]
        results = []
        for f in futures:
            try:
                results.append(f.result(timeout=300))
            except Exception as exc:  # collect, then fail with all of them
                errors.append(repr(exc))
    wall = time.perf_counter() - t_start
    try:
        assert errors == []
        assert len({r["client"].session_hash for r in results}) == N_SESSIONS
        for r in results:
            users = [_text(m["content"]) for m in r["history"] if m["role"] == "user"]
            tags = [re.match(r"\[(s\d+)-q(\d)\]", u).groups() for u in users]
            assert tags == [(f"s{r['i']}", str(j)) for j in range(N_QUESTIONS)], (r["i"], users)  # own, in order
            assert len(r["history"]) == 2 * N_QUESTIONS
            assert r["label"] in r["facts"] and f"example-{1 - r['i'] % 2}" not in r["facts"]
        # server side (clients still connected): one session per client, each with its own transcript
        live = {s.session_id: s for s in service.registry.sessions()}
        for r in results:
            session = live[r["client"].session_hash]
            assert len(session.transcript) == 2 * N_QUESTIONS and session.source_name == r["label"]
        # a client that goes away ends its session: state dropped, temp folder deleted
        for r in results:
            r["client"].close()
        t_close = time.perf_counter()
        deadline = time.time() + 75  # the server notices a closed heartbeat stream within ~2 heartbeats (15 s)

        def ended() -> bool:  # left the registry, then its folder deleted (closing runs after the session leaves)
            return (not any(r["client"].session_hash in service.registry for r in results)
                    and not any(s.workdir.exists() for s in live.values()))

        while time.time() < deadline and not ended():
            time.sleep(0.2)
        assert not any(r["client"].session_hash in service.registry for r in results)
        assert not any(s.workdir.exists() for s in live.values())
        cleanup_s = time.perf_counter() - t_close
        # the app still answers a fresh client afterwards
        status = Client(url, verbose=False).predict("example-0", None, True, 0.45, api_name="/open_example")[0]
        assert "Opened" in status
    finally:
        demo.close()
        service.registry.close_all()
    n_asks = len(latencies["ask"])
    numbers = {
        "sessions": N_SESSIONS, "questions_per_session": N_QUESTIONS, "model_concurrency": 2,
        "wall_s": round(wall, 2), "session_cleanup_s": round(cleanup_s, 2), "answers_per_s": round(n_asks / wall, 2), "errors": len(errors),
        "open_s": {"p50": round(statistics.median(latencies["open"]), 2),
                   "p95": round(_percentile(latencies["open"], 0.95), 2), "max": round(max(latencies["open"]), 2)},
        "ask_s": {"p50": round(statistics.median(latencies["ask"]), 2),
                  "p95": round(_percentile(latencies["ask"], 0.95), 2), "max": round(max(latencies["ask"]), 2)},
    }
    out = test_output / "app"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"load_test_{n_sessions}x{n_questions}.json").write_text(json.dumps(numbers, indent=2) + "\n")
    print("\nload test:", json.dumps(numbers))
