"""The HTTP server: completions equal sample.py's for the same seed and knobs, streaming equals the answer in one
piece, concurrent requests batched together each get what they would get alone (stops included), every class
of bad request its 4xx, a disconnected client's slot freed, a newer checkpoint picked up, and the page driven
in a real headless Chromium."""

import contextlib
import dataclasses
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time

import jax
import pytest
from fastapi.testclient import TestClient

from gpt.cli import run_sample, run_train
from gpt.config import MeshConfig, ServeConfig
from gpt.serve.api import create_app
from gpt.serve.engine import Engine, Request
from gpt.serve.served import Served
from tests.helpers import REPO, TINY, run_command, simulated_devices_env


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("served")
    assert run_train([*TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--checkpoint_interval=4"]) == 0
    return out


@pytest.fixture(scope="module")
def server(run_dir):
    served = Served(ServeConfig(out_dir=str(run_dir), step=4, max_batch=4, max_queue=8, reload_interval=0),
                    MeshConfig(), log=lambda text: None)
    served.engine.warm_up(served.engine.shapes())  # every decode shape: which one runs never depends on timing
    served.engine.start()
    with TestClient(create_app(served)) as client:
        yield served, client
    served.close()


def complete(client, **body):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_completion_equals_sample_py(server, run_dir, capsys):
    served, client = server
    for knobs in ({"temperature": 0.0}, {"temperature": 0.9, "top_k": 20}, {"temperature": 1.0, "top_p": 0.8}):
        code, out, _ = run_command(run_sample, [f"--out_dir={run_dir}", "--step=4", "--start=ROMEO:", "--num_samples=1",
                                                 "--max_new_tokens=24", "--seed=7", "--json=True",
                                                 *(f"--{k}={v}" for k, v in knobs.items())], capsys)
        assert code == 0
        expected = json.loads(out.splitlines()[-1])["text"]
        answer = complete(client, prompt="ROMEO:", max_tokens=24, seed=7, **{"top_k": 0, "top_p": 1.0, **knobs})
        assert answer["choices"][0]["text"] == expected, knobs
        assert answer["usage"] == {"prompt_tokens": 6, "completion_tokens": 24, "total_tokens": 30}


def stream_text(client, **body) -> tuple[str, list[dict]]:
    events = []
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    text = "".join(c["text"] for e in events for c in e["choices"])
    return text, events


@pytest.fixture
def engine(server):
    """A fresh engine on the served parameters, its largest decode shape compiled, its log kept in .logs."""
    served, _ = server
    logs = []
    engine = Engine(served.cfg, served.engine.params, served.tokenizer.eot_token, max_batch=4, max_queue=8,
                    log=logs.append)
    engine.logs = logs
    engine.warm_up()
    engine.start()
    yield engine
    engine.close()


def finished(engine, prompt: list[int], max_tokens: int = 16) -> Request:
    """A request run through the engine to its end."""
    done = threading.Event()
    request = Request(prompt, max_tokens, 0.8, 0, 1.0, 0.0, seed=5, logprobs=-1, emit=lambda r: r.finish and done.set())
    engine.submit([request])
    assert done.wait(60)
    return request


def test_a_shape_not_compiled_yet_is_served_at_a_larger_one_and_compiled_in_the_background(server, engine):
    prompt = server[0].tokenizer.encode("ROMEO:")
    assert [shape for shape in engine.compiled if shape[0] == "decode"] == [("decode", 4, engine.length)]
    first = finished(engine, prompt)  # at 4 rows: 1 is wanted
    deadline = time.time() + 60
    while ("decode", 1, engine.length) not in engine.compiled and time.time() < deadline:
        time.sleep(0.05)
    assert ("decode", 1, engine.length) in engine.compiled
    assert any(line.startswith(f"compiled the decode chunk for 1 rows over {engine.length}") for line in engine.logs)
    again = finished(engine, prompt)  # at 1 row now
    assert first.finish == again.finish == "length" and again.tokens == first.tokens


def test_a_failed_call_that_consumed_the_cache_fails_its_request_and_the_engine_goes_on(server, engine):
    prompt = server[0].tokenizer.encode("ROMEO:")
    shape = ("prefill", 1, 8)  # one prompt of 6 tokens, in the bucket of 8
    prefill = engine.compiled[shape]

    def out_of_memory(params, cache, logits, *args):  # as a donating call that fails on the device leaves things
        for x in jax.tree.leaves((cache, logits)):
            x.delete()
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")

    engine.compiled[shape] = out_of_memory
    assert finished(engine, prompt).finish == "error"
    assert any("RESOURCE_EXHAUSTED" in line for line in engine.logs)
    engine.compiled[shape] = prefill
    after = finished(engine, prompt)
    assert after.finish == "length" and len(after.tokens) == 16 and engine.counts()["alive"]


def test_streaming_yields_the_text_of_the_answer_in_one_piece(server):
    _, client = server
    body = {"prompt": "JULIET:", "max_tokens": 24, "temperature": 0.8, "seed": 3, "stop": ["\n\n"]}
    text, events = stream_text(client, **body, stream_options={"include_usage": True})
    assert len(events) > 2 and events[-1]["usage"]["completion_tokens"] > 0  # streamed in pieces, usage last
    assert text == complete(client, **body)["choices"][0]["text"]


@pytest.mark.parametrize("echo", [False, True])
def test_streamed_logprobs_are_those_of_the_answer_in_one_piece(server, echo):
    """Each event carries the log-probabilities of the tokens its text completes; together they are the plain
    answer's (echo: the prompt's scores come with the prompt's event), offsets included."""
    _, client = server
    body = {"prompt": "ROMEO:", "max_tokens": 20, "temperature": 0.9, "seed": 11, "logprobs": 3, "echo": echo,
            "stop": ["\n\n"]}
    _, events = stream_text(client, **body)
    streamed = [c["logprobs"] for e in events for c in e["choices"] if c["logprobs"]]
    joined = {k: [v for piece in streamed for v in piece[k]] for k in ("tokens", "token_logprobs", "top_logprobs",
                                                                      "text_offset")}
    plain = complete(client, **body)["choices"][0]["logprobs"]
    assert joined["tokens"] == plain["tokens"] and joined["text_offset"] == plain["text_offset"]
    assert joined["token_logprobs"] == pytest.approx(plain["token_logprobs"], abs=1e-5)
    assert [d and sorted(d) for d in joined["top_logprobs"]] == [d and sorted(d) for d in plain["top_logprobs"]]


def test_a_stream_tells_the_logprobs_of_tokens_whose_text_it_has_shown_whole(server):
    served, _ = server
    ids = list("héllo".encode())  # the byte tokenizer: é is two tokens
    assert [served.whole_tokens(ids, 0, chars) for chars in range(6)] == [0, 1, 3, 4, 5, 6]
    assert served.whole_tokens(ids, 3, 2) == 3  # never fewer than already told


def test_concurrent_requests_each_get_what_they_would_get_alone(server, monkeypatch):
    """8 requests at once (a batch of 4 slots: requests join as others leave, those of one prompt length
    prefilled together), each with its own seed, knobs and stop string: each answer equals that request made
    alone, its log-probabilities too (batch mates that turn the top-k, top-p, min-p filters, greedy decoding or
    log-probabilities on or off change nothing), and stops where it should."""
    served, client = server
    knobs = [{}, {"top_k": 20, "logprobs": 1}, {"top_p": 0.8, "logprobs": 1}, {"temperature": 0.0, "logprobs": 1},
             {"min_p": 0.05, "logprobs": 1}, {"logprobs": 2}, {"top_k": 5, "top_p": 0.9, "logprobs": 1}, {}]
    bodies = [{"prompt": p, "max_tokens": 12 + i, "temperature": 0.7 + 0.05 * i, "seed": i, **knobs[i]}
              for i, p in enumerate(["ROMEO:", "KING:", "A", "To be or not", "HAMLET:", "First Citizen", "Enter", "O"])]
    for i, body in enumerate(bodies[::2]):  # every other request stops at a string its own answer holds
        text = complete(client, **body)["choices"][0]["text"]
        body["stop"] = text[4 + i: 6 + i]
    alone = [complete(client, **b)["choices"][0] for b in bodies]
    answers = [None] * len(bodies)

    def ask(i):
        answers[i] = complete(client, **bodies[i])["choices"][0]

    batched = []  # the requests in flight at each chunk
    chunk = served.engine._chunk
    monkeypatch.setattr(served.engine, "_chunk", lambda: (batched.append(sum(map(bool, served.engine.slots))), chunk()))
    with served.engine.lock:  # all 8 wait in the queue, then join the batch as slots free
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while served.engine.waiting.qsize() < len(bodies) and time.time() < deadline:
            time.sleep(0.01)
    for t in threads:
        t.join()
    assert max(batched) == served.engine.max_batch
    for body, answer, single in zip(bodies, answers, alone):
        assert answer["text"] == single["text"] and answer["finish_reason"] == single["finish_reason"]
        if "logprobs" in body:  # the same tokens and alternatives; values to float rounding (another batch shape)
            got, want = answer["logprobs"], single["logprobs"]
            assert got["tokens"] == want["tokens"] and got["token_logprobs"] == pytest.approx(want["token_logprobs"], abs=1e-4)
            assert [list(d) for d in got["top_logprobs"]] == [list(d) for d in want["top_logprobs"]]
        if "stop" in body:
            assert body["stop"] not in answer["text"] and answer["finish_reason"] == "stop"
        else:
            assert answer["finish_reason"] == "length"


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    ({"prompt": "x", "bogus": 1}, 400, "bogus"),
    ({"prompt": "x", "temperature": 3}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "logprobs": 9}, 400, "logprobs"),
    ({"prompt": ""}, 400, "prompt"),
    ({"max_tokens": 4}, 400, "prompt"),
    ({"prompt": "x" * 30, "max_tokens": 8}, 400, "prompt"),  # 30 + 8 tokens > the context of 32
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": ["a", "b", "c"], "n": 3}, 400, "n"),  # 9 choices: more than the queue of 8 could ever hold
    ({"prompt": "x", "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ({"prompt": [1, 2, 999]}, 400, "prompt"),  # token ids outside the vocabulary of 256
])
def test_bad_requests_are_4xx_naming_the_field(server, body, status, param):
    _, client = server
    r = (client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
         if isinstance(body, bytes) else client.post("/v1/completions", json=body))
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"


def test_too_many_requests_is_429_and_the_server_goes_on(server):
    served, client = server
    with served.engine.lock:  # the engine admits nothing while the test fills its queue of 8
        answers: queue.Queue = queue.Queue()
        threads = [threading.Thread(target=lambda: answers.put(client.post(
            "/v1/completions", json={"prompt": "A", "max_tokens": 4}).status_code)) for _ in range(8)]
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while served.engine.waiting.qsize() < 8 and time.time() < deadline:
            time.sleep(0.01)
        r = client.post("/v1/completions", json={"prompt": "A", "max_tokens": 4})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_exceeded"
    for t in threads:
        t.join()
    assert sorted(answers.queue) == [200] * 8
    assert client.get("/health").json()["status"] == "ok"


def test_a_client_that_disconnects_frees_its_slot(server, monkeypatch):
    served, client = server
    submitted = []
    submit = served.engine.submit
    monkeypatch.setattr(served.engine, "submit", lambda requests: (submitted.extend(requests), submit(requests)))
    chunk = served.engine._chunk

    def chunk_then_wait():  # after each chunk of 8 tokens the engine waits (up to 10 s) for the hang-up
        chunk()
        deadline = time.time() + 10
        while not submitted[0].cancelled.is_set() and time.time() < deadline:
            time.sleep(0.01)

    monkeypatch.setattr(served.engine, "_chunk", chunk_then_wait)
    r = client.stream("POST", "/v1/completions", json={"prompt": "A", "max_tokens": 30, "stream": True})
    response = r.__enter__()
    next(response.iter_lines())
    r.__exit__(None, None, None)
    deadline = time.time() + 10
    while submitted[0].finish is None and time.time() < deadline:
        time.sleep(0.05)
    assert submitted[0].finish == "cancelled" and len(submitted[0].tokens) < 30
    assert served.engine.counts()["active"] == 0


def test_echo_with_logprobs_scores_the_prompt(server):
    _, client = server
    choice = complete(client, prompt="ROMEO: hello", max_tokens=0, echo=True, logprobs=2)["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == "ROMEO: hello" and lp["tokens"] == list("ROMEO: hello")
    assert lp["token_logprobs"][0] is None and all(v < 0 for v in lp["token_logprobs"][1:])
    for chosen, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert len(top) == 2 and max(top.values()) >= chosen - 1e-6


def test_a_newer_checkpoint_is_picked_up(server, run_dir):
    """(Runs last of the fixture's tests: the server then serves step 8.)"""
    served, client = server
    assert client.get("/v1/models").json()["data"][0]["step"] == 4  # started at step 4 of 8
    score = lambda: complete(client, prompt="ROMEO: hello", max_tokens=0, echo=True,
                             logprobs=1)["choices"][0]["logprobs"]["token_logprobs"]
    before = score()
    assert client.post("/v1/reload").json() == {"step": 8, "reloaded": True}
    deadline = time.time() + 10  # taken between requests
    while client.get("/v1/models").json()["data"][0]["step"] != 8 and time.time() < deadline:
        time.sleep(0.05)
    assert client.get("/v1/models").json()["data"][0]["step"] == 8
    assert score() != before  # other parameters score the same text otherwise
    assert client.post("/v1/reload").json() == {"step": 8, "reloaded": False}


def test_a_newer_checkpoint_of_another_model_is_refused_once_and_logged(run_dir, monkeypatch):
    from gpt import checkpoint

    logs = []
    served = Served(ServeConfig(out_dir=str(run_dir), step=4, reload_interval=0), MeshConfig(), log=logs.append)
    load = checkpoint.load_params

    def another_model(out_dir, step, mesh):  # step 8 as if saved by a run of another shape
        cfg, params, meta, step = load(out_dir, step, mesh)
        return dataclasses.replace(cfg, n_layer=cfg.n_layer + 1), params, meta, step

    monkeypatch.setattr(checkpoint, "load_params", another_model)
    assert served.reload() == (4, False) and served.step == 4 and served.rejected == {8}
    assert sum("step 8" in line and "another model" in line for line in logs) == 1
    assert served.reload() == (4, False)  # not loaded again
    assert sum("another model" in line for line in logs) == 1
    served.close()


def test_a_reload_that_fails_without_a_message_is_logged_and_the_watch_goes_on(run_dir, monkeypatch):
    """(An OSError() has no message: taking its first line once killed the watching thread.)"""
    logs, calls = [], []
    served = Served(ServeConfig(out_dir=str(run_dir), step=4, reload_interval=0.05), MeshConfig(), log=logs.append)

    def failing():
        calls.append(1)
        raise OSError()

    monkeypatch.setattr(served, "reload", failing)
    served.watch()
    deadline = time.time() + 10
    while len(calls) < 2 and time.time() < deadline:
        time.sleep(0.02)
    served.close()
    assert len(calls) >= 2 and "warning: reload failed (OSError)" in logs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(tmp_path, *args: str, devices: int | None = None):
    """python -m gpt.serve *args in a subprocess (on `devices` simulated CPU devices if given); yields its URL
    once /health answers (it compiles before it listens)."""
    import httpx

    port = free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "gpt.serve", *args, f"--port={port}", "--reload_interval=0"],
                              cwd=REPO, stderr=log, stdout=log, env=None if devices is None else simulated_devices_env(devices))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            assert time.time() < deadline, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.mark.slow
def test_a_model_sharded_over_devices_serves_what_one_device_does(run_dir, tmp_path, capsys):
    """The server on 8 simulated devices, the model split over a tensor axis of 2 (the cache replicated beside
    it): greedy completions equal sample.py's on one device."""
    import httpx

    with server_process(tmp_path, f"--out_dir={run_dir}", "--step=4", "--mesh_data=4", "--mesh_tensor=2",
                        devices=8) as url:
        for prompt in ("ROMEO:", "KING:", "To be"):
            body = {"prompt": prompt, "max_tokens": 16, "temperature": 0.0}
            sharded = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
            code, out, _ = run_command(run_sample, [f"--out_dir={run_dir}", "--step=4", f"--start={prompt}",
                                                     "--num_samples=1", "--max_new_tokens=16", "--temperature=0",
                                                     "--json=True"], capsys)
            assert code == 0 and sharded == json.loads(out.splitlines()[-1])["text"]


@pytest.mark.slow
def test_the_page_streams_a_completion_in_a_real_browser(run_dir, tmp_path):
    """python -m gpt.serve in a subprocess; Debian's headless Chromium, driven by Selenium, types a prompt,
    presses Generate and sees the streamed completion: the same text the API answers for the same request."""
    import httpx
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        missing = "Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("REQUIRE_BROWSER_TEST"):  # .ci/run sets it: there the test must run
            pytest.fail(missing)
        pytest.skip(missing)
    with server_process(tmp_path, f"--out_dir={run_dir}") as url:
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--no-first-run"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(chromedriver))
        try:
            driver.get(f"{url}/")
            prompt = driver.find_element(By.ID, "prompt")
            prompt.clear()
            prompt.send_keys("KING:")
            driver.find_element(By.ID, "max_tokens").clear()
            driver.find_element(By.ID, "max_tokens").send_keys("24")
            driver.find_element(By.ID, "go").click()
            WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "status").text.startswith("done"))
            text = driver.execute_script("return document.getElementById('completion').textContent")
            assert driver.find_element(By.ID, "status").text == "done: 24 tokens"
        finally:
            driver.quit()
        # The page's knobs by default: temperature 0.8, top_k 0, top_p 1, seed 1337.
        expected = httpx.post(f"{url}/v1/completions", json={"prompt": "KING:", "max_tokens": 24, "temperature": 0.8,
                                                             "seed": 1337}).json()["choices"][0]["text"]
        assert text == expected and len(text) > 0
