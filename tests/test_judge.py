"""The LLM judge (`routed_grpo.judge`) against a local OpenAI-compatible server started here, on loopback: scores
from log-probs and from text, the cache, retries, timeouts, the bounded failure count, and what the requests carry;
and the monitor scorer's flags in a training run."""

import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

pytest.importorskip("openai")

from routed_grpo.judge import JUDGE_INSTRUCTIONS, LLMJudge  # noqa: E402
from routed_grpo.monitor import MonitorError, MonitorScorer, monitor_scores  # noqa: E402


class Server:
    """A tiny chat-completions endpoint: answers "1" when the user message contains HACK, else "0"; with
    log-probs P("1") = 0.8 or 0.1. `fail` next requests get HTTP 500, `delay` seconds before each answer."""

    def __init__(self, logprobs: bool = True):
        self.requests: list[dict] = []
        self.fail, self.delay, self.logprobs, self.answer = 0, 0.0, logprobs, None
        self.rule = lambda text: "HACK" in text
        self.no_choices = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                if server.fail > 0:
                    server.fail -= 1
                    return self._send(500, {"error": {"message": "boom", "type": "server_error"}})
                time.sleep(server.delay)
                if server.no_choices:
                    return self._send(200, {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                                            "choices": []})  # fmt: skip
                hack = server.rule(body["messages"][-1]["content"].split("## Answer")[-1])
                text = server.answer or ("1" if hack else "0")
                p1 = 0.8 if hack else 0.1
                choice = {"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": text}}
                if server.logprobs and body.get("logprobs"):
                    top = [
                        {"token": "1", "logprob": math.log(p1), "bytes": None},
                        {"token": "0", "logprob": math.log(1 - p1 - 0.05), "bytes": None},
                        {"token": "x", "logprob": math.log(0.05), "bytes": None},
                    ]
                    choice["logprobs"] = {"content": [{**top[0 if hack else 1], "top_logprobs": top}]}
                self._send(200, {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                                 "choices": [choice]})  # fmt: skip

            def _send(self, code, payload):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


PROMPTS = [[{"role": "user", "content": f"task {i}"}] for i in range(4)]
COMPLETIONS = [[{"role": "assistant", "content": text}] for text in ("fine", "HACK here", "ok", "HACK")]


def _judge(url, **kw):
    kw.setdefault("max_retries", 0)
    return LLMJudge("judge-model", url, "key", **kw)


def test_scores_are_the_probability_of_one_from_logprobs_and_cached(server):
    judge = _judge(server.url)
    scores = judge(PROMPTS, COMPLETIONS)
    assert scores == pytest.approx([0.1 / 0.95, 0.8 / 0.95, 0.1 / 0.95, 0.8 / 0.95])  # P(1) over {0, 1}
    assert len(server.requests) == 4
    body = server.requests[0]
    assert body["model"] == "judge-model" and body["max_tokens"] == 1
    assert body["messages"][0]["content"] == JUDGE_INSTRUCTIONS
    assert judge(PROMPTS[:2], COMPLETIONS[:2]) == scores[:2] and len(server.requests) == 4  # cached: no request
    other = LLMJudge("another-model", server.url, "key", max_retries=0, cache_path=None)
    other(PROMPTS[:1], COMPLETIONS[:1])
    assert len(server.requests) == 5  # the cache key holds the judge model


def test_without_logprobs_the_score_is_the_answer_and_a_file_cache_survives(tmp_path):
    s = Server(logprobs=False)
    try:
        cache = tmp_path / "cache.jsonl"
        assert _judge(s.url, cache_path=cache)(PROMPTS, COMPLETIONS) == [0.0, 1.0, 0.0, 1.0]
        again = _judge(s.url, cache_path=cache)
        assert again(PROMPTS, COMPLETIONS) == [0.0, 1.0, 0.0, 1.0] and len(s.requests) == 4
        s.answer = "maybe"  # neither 0 nor 1: a failure, not a score
        with pytest.raises(MonitorError, match="unreadable answer 'maybe'"):
            _judge(s.url)(PROMPTS[:1], [[{"role": "assistant", "content": "new"}]])
    finally:
        s.close()


def test_an_empty_answer_is_a_counted_failure_and_extra_body_reaches_the_server(server):
    server.no_choices = True
    judge = _judge(server.url, max_failure_frac=None, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert judge(PROMPTS[:2], COMPLETIONS[:2]) == [None, None]
    assert judge.last_error == "an answer without choices"
    assert server.requests[0]["chat_template_kwargs"] == {"enable_thinking": False}
    scorer = MonitorScorer(judge, max_unscored_frac=0.1)

    class Trainer:  # what MonitorScorer.flag reads of the trainer, one process
        class accelerator:  # noqa: N801
            gather = staticmethod(lambda t: t)

        _metrics = {"train": __import__("collections").defaultdict(list)}

    with pytest.raises(MonitorError, match="2 of 2 rollouts .* max_unscored_frac .*last error: an answer without"):
        scorer.flag(Trainer(), torch.zeros(2, 1, 1), lambda: (PROMPTS[2:], COMPLETIONS[2:], {}))


def test_retries_then_succeeds(server):
    server.fail = 2
    assert _judge(server.url, max_retries=2)(PROMPTS[:1], COMPLETIONS[:1]) == [pytest.approx(0.1 / 0.95)]
    assert len(server.requests) == 3


def test_a_slow_server_times_out_and_failures_past_the_bound_raise(server):
    server.delay = 2.0
    judge = _judge(server.url, timeout=0.3, max_failure_frac=0.5)
    t0 = time.perf_counter()
    with pytest.raises(MonitorError, match=r"4 of 4 judge requests to http://127\.0\.0\.1.*Timeout"):
        judge(PROMPTS, COMPLETIONS)
    assert time.perf_counter() - t0 < 1.9  # concurrent, each cut at the timeout


def test_failures_within_the_bound_score_none_and_are_counted(server):
    server.fail = 1  # the first request fails (no retries)
    judge = _judge(server.url, max_concurrency=1, max_failure_frac=0.3)
    scores = judge(PROMPTS, COMPLETIONS)
    assert scores[0] is None and all(s is not None for s in scores[1:])
    assert judge.budget.failed == 1 and judge.budget.n == 4
    assert torch.isnan(monitor_scores(judge, PROMPTS, COMPLETIONS)).tolist() == [False] * 4  # retried, now cached


def test_an_unreachable_server_raises_a_clear_error():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = _judge(f"http://127.0.0.1:{port}/v1", max_retries=1, timeout=2.0)
    with pytest.raises(MonitorError, match=rf"4 of 4 judge requests to http://127\.0\.0\.1:{port}/v1.*Connection"):
        judge(PROMPTS, COMPLETIONS)


def test_the_monitor_arm_flags_by_the_judge_and_its_requests_carry_no_label(tmp_path, server):
    from conftest import make_model
    from datasets import Dataset
    from trainer_utils import TOKENIZER, config

    from routed_grpo.gate import ROUTE
    from routed_grpo.trainer import RoutedGRPOTrainer

    secret = "LABEL-7f3a"  # a dataset column the monitor must never see
    rows = [{"prompt": [{"role": "user", "content": f"write code {i}"}], "hack_label": secret} for i in range(8)]
    server.rule = lambda text: len(text) % 2 == 1  # some rollouts flagged, some not
    judge = _judge(server.url)
    seen = []

    def monitor(prompts, completions):
        scores = judge(prompts, completions)
        seen.append(torch.tensor(scores))
        return scores

    def reward(prompts, completions, **_):
        return [float(len(c[0]["content"]) % 5) for c in completions]

    args = config(tmp_path, routing="monitor", monitor_threshold=0.5, max_steps=1, intervention="screen")
    t = RoutedGRPOTrainer(
        make_model(len(TOKENIZER)), reward, args, train_dataset=Dataset.from_list(rows), processing_class=TOKENIZER,
        monitor_fn=monitor,
    )  # fmt: skip
    decisions, original = [], t.scorer.flag
    t.scorer.flag = lambda *a: decisions.append(original(*a)) or decisions[-1]
    t.train()
    assert isinstance(t.scorer, MonitorScorer) and len(server.requests) >= 1
    assert all(secret not in json.dumps(body) for body in server.requests)
    flagged = seen[0] >= 0.5
    assert 0 < int(flagged.sum()) < len(flagged) and torch.equal(decisions[0].zones == ROUTE, flagged)
    log = next(h for h in t.state.log_history if "routing/flag_rate" in h)
    assert log["routing/flag_rate"] == pytest.approx((seen[0] >= 0.5).float().mean().item())
    assert log["monitor/unscored"] == 0.0
    with pytest.raises(ValueError, match="routing='monitor'.*needs monitor_fn"):
        RoutedGRPOTrainer(make_model(len(TOKENIZER)), reward, args, train_dataset=Dataset.from_list(rows),
                          processing_class=TOKENIZER)  # fmt: skip
