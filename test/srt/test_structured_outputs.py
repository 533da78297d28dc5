"""Structured outputs (json_schema, regex, ebnf; response_format on the OpenAI routes): every
output parses and validates against its constraint, with random weights and sampling at
temperature 1; constrained requests are batch-, overlap- and chunking-invariant and leave the
unconstrained requests of their batch alone; bad grammars and unavailable backends are 400s."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import close_logprobs

from sglab.srt.constrained import grammar_backend
from sglab.srt.constrained.grammar_backend import Grammar, create_grammar_backend
from sglab.test.runners import SchedulerRunner
from sglab.test.schedule_invariance import forced_retraction

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

SERVER_ARGS = ["--skip-server-warmup", "--constrained-json-disable-any-whitespace"]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["ok", "color", "n"],
          "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green"]},
                         "n": {"type": "integer", "minimum": 0, "maximum": 9}}}
REGEX = r"(yes|no)-[0-9]{2}"
EBNF = 'root ::= "x" ("a" | "b") ("a" | "b") "!"'
# xgrammar's structural tag: a tag whose content is a regex; and upstream's legacy form.
TAG = {"type": "structural_tag", "format": {
    "type": "tag", "begin": "<f>", "content": {"type": "regex", "pattern": REGEX},
    "end": "</f>"}}
LEGACY_TAG = {"type": "structural_tag", "triggers": ["<f>"], "at_least_one": True,
              "structures": [{"begin": "<f>", "schema": SCHEMA, "end": "</f>"}]}
SAMPLED = {"temperature": 1.0, "max_new_tokens": 48}
PROMPTS = [[5, 6, 7], [8, 9, 10, 11], [300, 301, 302, 303, 304, 305]]


@pytest.fixture(scope="module")
def path(tiny_model_dir):
    return tiny_model_dir("tiny-qwen3")


def _runner(path, **kw) -> SchedulerRunner:
    return SchedulerRunner(model_path=path, constrained_json_disable_any_whitespace=True, **kw)


@pytest.fixture(scope="module")
def runner(path):
    return _runner(path)


def _text(runner: SchedulerRunner, out) -> str:
    return runner.tokenizer.decode(out.output_ids, skip_special_tokens=True)


CONSTRAINTS = {
    "json_schema": (json.dumps(SCHEMA), lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
    "regex": (REGEX, lambda t: re.fullmatch(REGEX, t) or pytest.fail(t)),
    "ebnf": (EBNF, lambda t: re.fullmatch(r"x[ab]{2}!", t) or pytest.fail(t)),
    "structural_tag": (json.dumps(TAG),
                       lambda t: re.fullmatch(f"<f>{REGEX}</f>", t) or pytest.fail(t)),
}


@pytest.mark.parametrize("kind", CONSTRAINTS)
def test_every_sample_satisfies_its_constraint(runner, kind):
    spec, check = CONSTRAINTS[kind]
    outs = runner.generate(PROMPTS, {**SAMPLED, kind: spec, "sampling_seed": 3})
    for out in outs:
        assert out.finish_reason["type"] == "stop", out.finish_reason
        check(_text(runner, out))
    assert runner.integrity_error() is None


def test_unconstrained_neighbours_and_schedules_are_unchanged(path, runner):
    """One constrained request among greedy ones: the others keep their exact tokens; the
    constrained one samples the same under overlap, chunked prefill and a warm radix cache."""
    greedy = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    plain = runner.generate(PROMPTS, greedy)
    spec = {**SAMPLED, "json_schema": json.dumps(SCHEMA), "sampling_seed": 4}
    long_prompt = list(range(40, 90))
    rids = [runner.submit(p, spec if i == 1 else greedy) for i, p in enumerate(PROMPTS)]
    rids.append(runner.submit(long_prompt, spec))
    outs = runner.run()
    assert [outs[rids[i]].output_ids for i in (0, 2)] == [plain[0].output_ids,
                                                           plain[2].output_ids]
    want = [outs[rids[1]].output_ids, outs[rids[3]].output_ids]
    for kw in ({"disable_overlap_schedule": True}, {"chunked_prefill_size": 16}, {}):
        other = _runner(path, **kw) if kw else runner  # {}: the same runner, radix warm
        got = other.generate([PROMPTS[1], long_prompt], spec)
        assert [o.output_ids for o in got] == want, kw
        assert other.integrity_error() is None


@pytest.mark.parametrize("params,message", [
    ({"regex": "("}, "Invalid regex: Regex parsing error"),
    ({"json_schema": "{not json"}, "Invalid json_schema: "),
    ({"ebnf": "root ::= undefined_rule"}, "Invalid ebnf: "),
    ({"structural_tag": '{"structures": 3}'}, "Invalid structural_tag: "),
    ({"structural_tag": '{"format": {"type": "nope"}}'}, "Invalid structural_tag: "),
])
def test_an_invalid_grammar_refuses_only_its_request(runner, params, message):
    bad = runner.submit([5, 6], {**SAMPLED, **params})
    good = runner.submit([5, 6], {**SAMPLED, "regex": REGEX})
    outs = runner.run()
    reason = outs[bad].finish_reason
    assert reason["type"] == "abort" and reason["status_code"] == 400
    assert reason["message"].startswith(message), reason
    assert re.fullmatch(REGEX, _text(runner, outs[good]))


# --- overlap: the forward of step N+1 runs before step N's tokens reach the grammars -----------


@pytest.fixture(scope="module")
def no_overlap(path):
    return _runner(path, disable_overlap_schedule=True)


def _mixed(runner: SchedulerRunner, sampling: dict) -> list:
    """Every constraint kind with unconstrained neighbours, penalties and logprobs in one batch;
    requests finish at different steps (a short grammar, a length limit mid-grammar)."""
    base = {**sampling, "max_new_tokens": 24}
    work = [(PROMPTS[0], {"json_schema": CONSTRAINTS["json_schema"][0]}, True),
            (PROMPTS[1], {"regex": REGEX, "frequency_penalty": 0.7}, False),
            (PROMPTS[2], {"ebnf": EBNF}, True),
            ([5, 6, 7, 8], {"structural_tag": CONSTRAINTS["structural_tag"][0]}, False),
            (list(range(40, 52)), {"ignore_eos": True, "presence_penalty": 0.5}, True),
            ([9, 10], {"regex": REGEX, "max_new_tokens": 3}, False)]
    rids = [runner.submit(p, {**base, **extra}, return_logprob=lp, top_logprobs_num=2 * lp)
            for p, extra, lp in work]
    outs = runner.run()
    assert runner.integrity_error() is None
    return [(outs[r].output_ids, outs[r].finish_reason, outs[r].logprobs) for r in rids]


def _count_overlapped_grammar_steps(runner: SchedulerRunner, monkeypatch) -> dict:
    """Per decode launch of a batch with a grammar: whether the previous step's result was
    still unprocessed (the launch overlapped it)."""
    scheduler, seen = runner.scheduler, {"grammar_decodes": 0, "overlapped": 0}
    forward = scheduler.tp_worker.forward_batch_generation

    def counted(batch):
        if batch.forward_mode.is_decode() and scheduler.running_batch.request_facts().has_grammar:
            seen["grammar_decodes"] += 1
            seen["overlapped"] += bool(scheduler.result_queue)
        return forward(batch)

    monkeypatch.setattr(scheduler.tp_worker, "forward_batch_generation", counted)
    return seen


@pytest.mark.parametrize("sampling", [{"temperature": 0},
                                      {"temperature": 1.0, "sampling_seed": 5}],
                         ids=["greedy", "seeded"])
def test_grammar_batches_overlap_and_match_no_overlap(runner, no_overlap, sampling,
                                                      monkeypatch):
    """The overlap loop launches a grammar batch's decode before the previous step's result is
    processed (the mask is built after, then the batch samples), and gives the tokens,
    finishes and logprobs of the loop without overlap."""
    seen = _count_overlapped_grammar_steps(runner, monkeypatch)
    got, want = _mixed(runner, sampling), _mixed(no_overlap, sampling)
    assert [g[:2] for g in got] == [w[:2] for w in want]
    for (_, _, lp), (_, _, ref) in zip(got, want):  # batch sizes differ: fp32 reduction order
        assert close_logprobs(lp.get("output_token_logprobs_val", []),
                              ref.get("output_token_logprobs_val", []))
        assert lp.get("output_top_logprobs_idx") == ref.get("output_top_logprobs_idx")
    assert {r["type"] for _, r, _ in got} == {"stop", "length"}
    assert seen["grammar_decodes"] > 10
    assert seen["overlapped"] >= seen["grammar_decodes"] - 2, seen


def test_grammar_batches_under_retraction_match_no_overlap(path):
    """Retraction still lands the step in flight first; a retracted constrained request
    resumes with its grammar where it was."""
    kw = {"enable_deterministic_inference": True, "chunked_prefill_size": 16}
    sampling = {"temperature": 1.0, "sampling_seed": 2}
    want = _mixed(_runner(path, disable_overlap_schedule=True, **kw), sampling)
    overlap = _runner(path, **kw)
    with forced_retraction(every=3) as forced:
        got = _mixed(overlap, sampling)
    assert forced[0] > 0
    assert [g[:2] for g in got] == [w[:2] for w in want]


def test_a_delayed_sample_that_fails_reruns_its_requests_one_by_one(runner, no_overlap,
                                                                   monkeypatch):
    """A failure inside the delayed sample (after the forward was launched) undoes the step
    and runs its requests alone, as a failing launch does: the scheduler keeps serving and
    the outputs are those without overlap."""
    spec = {**SAMPLED, "json_schema": CONSTRAINTS["json_schema"][0], "sampling_seed": 7}
    want = no_overlap.generate(PROMPTS, spec)
    model_runner = runner.scheduler.tp_worker.model_runner
    sample, state = model_runner.sample, {"decodes": 0}

    def failing_once(logits_output, forward_batch):
        if forward_batch.forward_mode.is_decode() and len(forward_batch.seq_lens_cpu) > 1:
            state["decodes"] += 1
            if state["decodes"] == 4:
                raise RuntimeError("sampler broke")
        return sample(logits_output, forward_batch)

    monkeypatch.setattr(model_runner, "sample", failing_once)
    got = runner.generate(PROMPTS, spec)
    assert state["decodes"] > 4
    assert [(o.output_ids, o.finish_reason) for o in got] == \
        [(o.output_ids, o.finish_reason) for o in want]
    assert runner.integrity_error() is None


def test_a_grammar_that_fails_to_fill_its_mask_fails_only_its_request(runner, monkeypatch):
    """Raised while the mask is built (after the forward, under overlap): that request ends
    with a 500 at its third token (sampled unmasked, as a rejected token, it ends the output),
    its neighbours with what they give alone."""
    spec = {**SAMPLED, "regex": REGEX, "sampling_seed": 6}
    want = runner.generate([PROMPTS[0], PROMPTS[2]], spec)
    backend, fill = runner.scheduler.grammar_backend, Grammar.fill_bitmask
    made, fills = [], {"n": 0}

    def new_grammar(compiled):
        made.append(Grammar(backend.xgr.GrammarMatcher(compiled)))
        return made[-1]

    def failing(self, bitmask, row):
        if self is made[0]:  # the first admitted: the bad request's
            fills["n"] += 1
            if fills["n"] == 3:
                raise RuntimeError("matcher broke")
        fill(self, bitmask, row)

    monkeypatch.setattr(backend, "new_grammar", new_grammar)
    monkeypatch.setattr(Grammar, "fill_bitmask", failing)
    bad = runner.submit(PROMPTS[1], spec)
    good = [runner.submit(p, spec) for p in (PROMPTS[0], PROMPTS[2])]
    outs = runner.run()
    reason = outs[bad].finish_reason
    assert reason["type"] == "abort" and reason["status_code"] == 500, reason
    assert "filling its grammar's mask" in reason["message"], reason
    assert "matcher broke" in reason["message"]
    assert len(outs[bad].output_ids) == 3
    assert [outs[r].output_ids for r in good] == [o.output_ids for o in want]
    assert runner.integrity_error() is None


@pytest.mark.parametrize("name,message", [
    ("none", "Grammar-constrained decoding is off (--grammar-backend none)."),
    ("outlines", "The grammar backend 'outlines' is not installed in sglab"),
    ("llguidance", "The grammar backend 'llguidance' is not installed in sglab"),
])
def test_unavailable_backends_say_so(name, message):
    backend, refusal = create_grammar_backend(name, object(), 1024, {1}, True)
    assert backend is None and refusal.startswith(message)


# --- a real server ------------------------------------------------------------------------------

def test_openai_response_format_json_schema(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    res = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Answer in JSON."}],
        max_tokens=48, temperature=1.0, n=3, seed=1, response_format=fmt)
    for choice in res.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_openai_regex_and_ebnf_extras(client):
    res = client.completions.create(model="default", prompt="Well?", max_tokens=20,
                                    temperature=1.0, n=2, extra_body={"regex": REGEX})
    assert all(re.fullmatch(REGEX, c.text) for c in res.choices), res.choices
    res = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "x"}], max_tokens=20,
        extra_body={"ebnf": EBNF})
    assert re.fullmatch(r"x[ab]{2}!", res.choices[0].message.content)


def test_openai_structural_tag_response_format(client):
    """Both of upstream's forms; the legacy one with at_least_one starts with its tag."""
    res = client.completions.create(model="default", prompt="Call:", max_tokens=20, n=2,
                                    temperature=1.0, extra_body={"response_format": TAG})
    assert all(re.fullmatch(f"<f>{REGEX}</f>", c.text) for c in res.choices), res.choices
    res = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Call f."}], max_tokens=8,
        temperature=1.0, response_format=LEGACY_TAG)
    assert res.choices[0].message.content.startswith("<f>{")


def test_generate_json_schema_streams_valid_json(http, server):
    # Seed 486 draws, at one step, a noise that rounds to the edge of (0, 1), where the sampler
    # once picked a masked token (an abort: "The grammar does not accept token").
    body = {"text": "JSON:", "stream": True, "sampling_params": {
        **SAMPLED, "json_schema": json.dumps(SCHEMA), "sampling_seed": 486}}
    res = http.post(f"{server.base_url}/generate", json=body, stream=True, timeout=120)
    events = [json.loads(ln[6:]) for ln in res.iter_lines() if ln and ln != b"data: [DONE]"]
    assert len(events) > 1 and events[-1]["meta_info"]["finish_reason"]["type"] == "stop", \
        events[-1]["meta_info"]["finish_reason"]
    jsonschema.validate(json.loads(events[-1]["text"]), SCHEMA)


@pytest.mark.parametrize("path,body,message", [
    ("/generate", {"text": "a", "sampling_params": {"regex": "a", "ebnf": EBNF}},
     "Only one of regex, json_schema, or ebnf can be set."),
    ("/generate", {"text": "a", "sampling_params": {"regex": "("}},
     "Invalid regex: Regex parsing error at position 2"),
    ("/generate", {"text": "a", "sampling_params": {"json_schema": {"type": "object"}}},
     "json_schema must be a string."),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                              "response_format": {"type": "json_schema",
                                                  "json_schema": {"name": "x"}}},
     "schema_ is required for json_schema response format request."),
    ("/v1/completions", {"prompt": "a", "regex": "a", "response_format": {
        "type": "json_object"}}, "Only one of regex, json_schema, or ebnf can be set."),
])
def test_bad_constraints_are_400s_and_the_server_keeps_serving(http, server, path, body,
                                                               message):
    res = http.post(f"{server.base_url}{path}", json=body, timeout=60)
    assert res.status_code == 400, res.text
    assert res.json()["error"]["message"].startswith(message), res.text
    ok = http.post(f"{server.base_url}/generate", timeout=60, json={
        "text": "a", "sampling_params": {**SAMPLED, "regex": REGEX}}).json()
    assert re.fullmatch(REGEX, ok["text"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_constrained_samples_match_with_cuda_graphs_and_overlap(path):
    gpu = {"device": "cuda", "dtype": "float32", "attention_backend": "triton"}
    eager = _runner(path, disable_cuda_graph=True, disable_overlap_schedule=True, **gpu)
    graphs = _runner(path, **gpu)
    assert graphs.scheduler.tp_worker.model_runner.graph_runner is not None
    for kind, (spec, check) in CONSTRAINTS.items():
        params = {**SAMPLED, kind: spec, "sampling_seed": 8}
        want = eager.generate(PROMPTS, params)
        got = graphs.generate(PROMPTS, params)
        assert [o.output_ids for o in got] == [o.output_ids for o in want], kind
        for out in got:
            check(_text(graphs, out))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_delayed_mask_lands_before_the_sampler_reads_it(path, monkeypatch):
    """Every forward starts behind ~10 ms of GPU sleep, so each mask is built and uploaded
    while its forward is still queued: the upload on the forward stream lands before the
    sampler reads it (outputs match the eager loop without overlap). An upload on a side stream
    that the sampler does not wait for is caught by the same check."""
    gpu = {"device": "cuda", "dtype": "float32", "attention_backend": "triton"}
    want = _runner(path, disable_cuda_graph=True, disable_overlap_schedule=True,
                   **gpu).generate(PROMPTS, {**SAMPLED, "regex": REGEX, "sampling_seed": 9})
    overlap = _runner(path, **gpu)
    worker = overlap.scheduler.tp_worker
    forward = worker.forward_batch_generation

    def late(batch):
        torch.cuda._sleep(20_000_000)
        return forward(batch)

    monkeypatch.setattr(worker, "forward_batch_generation", late)

    def outputs():
        outs = overlap.generate(PROMPTS, {**SAMPLED, "regex": REGEX, "sampling_seed": 9})
        return [o.output_ids for o in outs]

    assert outputs() == [o.output_ids for o in want]
    side = torch.cuda.Stream()

    def unwaited_upload(host, device):
        bitmask = torch.full(host.shape, -1, dtype=torch.int32, device=device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            torch.cuda._sleep(20_000_000)
            bitmask.copy_(host.pin_memory(), non_blocking=True)
        return bitmask  # the forward stream never waits for `side`

    monkeypatch.setattr(grammar_backend, "upload_bitmask", unwaited_upload)
    assert outputs() != [o.output_ids for o in want]  # sampled from the all-allowed mask
