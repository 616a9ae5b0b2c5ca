"""launch.chat and jaxalign.chat_session: template-encoded turns through the one sampler."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from hf_tokenizer_files import write_hf_dir
from presets import preset

from jaxalign import chat_session, policy, sampling
from jaxalign.models import hf
from jaxalign.models.transformer import Transformer, TransformerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt "
          "%}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# The test tokenizer has 420 ids; the embedding has a few rows more.
TINY = dict(vocab_size=448, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
            mlp_dim=48)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random tiny Llama as an HF checkpoint, with a ChatML tokenizer."""
    path = tmp_path_factory.mktemp("chat_hf") / "model"
    cfg = TransformerConfig(**TINY)
    params = jax.device_get(nnx.to_pure_dict(nnx.state(
        Transformer(cfg, rngs=nnx.Rngs(params=3)), nnx.Param)))
    hf.save_pretrained(params, cfg, str(path))
    write_hf_dir(path, "chatml", chat_template=CHATML)
    return str(path)


@pytest.fixture(scope="module")
def model(hf_dir):
    return chat_session.load_chat_model(f"hf:{hf_dir}")


def _direct(model, prompts, cfg, rng, width):
    """The sampler itself, on prompts left-padded to ``width``."""
    tokens_bt, mask_bt = sampling.left_pad(prompts, cfg.pad_id, width)
    out = sampling.sample(model.model_def.merge(model.params), tokens_bt, mask_bt, rng, cfg)
    return sampling.trim(out)


def test_one_shot_greedy_is_the_samplers_greedy(model):
    assert model.template.name == "tokenizer"  # the directory's own Jinja template
    specials = model.tokenizer.special_tokens
    assert specials["<|im_end|>"] in model.stop_ids and model.tokenizer.eos_id in model.stop_ids
    cfg = model.sampling_config(max_new_tokens=12, temperature=0.0)
    session = chat_session.ChatSession(model, cfg, system="Be brief.", seed=5)
    reply = session.send("What is 2 + 2?")

    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2 + 2?"}]
    prompt = model.template.encode_prompt(messages)
    assert model.tokenizer.decode(prompt, skip_special=False).endswith(
        "<|im_start|>assistant\n")
    (want,) = _direct(model, [prompt], cfg, jax.random.PRNGKey(0), policy.bucket(len(prompt)))
    assert reply.ids == want
    content = want[:-1] if want[-1] in model.stop_ids else want
    assert reply.text == model.tokenizer.decode(content)
    assert reply.stopped == (want[-1] in model.stop_ids and len(want) <= 12)


def test_history_is_re_encoded_each_turn_and_reset(model):
    cfg = model.sampling_config(max_new_tokens=6, temperature=0.0)
    session = chat_session.ChatSession(model, cfg)
    first = session.send("Hello!")
    assert session.conversation("Next") == [
        {"role": "user", "content": "Hello!"}, {"role": "assistant", "content": first.text},
        {"role": "user", "content": "Next"}]
    second = session.send("Next")
    prompt = model.template.encode_prompt(session.messages[:3])
    (want,) = _direct(model, [prompt], cfg, jax.random.PRNGKey(0), policy.bucket(len(prompt)))
    assert second.ids == want and len(session.messages) == 4
    session.reset()
    assert session.messages == [] and session.send("Hello!").ids == first.ids


def test_sampled_turns_follow_the_seed(model):
    cfg = model.sampling_config(max_new_tokens=6, temperature=1.0, top_k=20, top_p=0.9)
    a = [chat_session.ChatSession(model, cfg, seed=s).send("Hi") for s in (1, 1, 2)]
    assert a[0].ids == a[1].ids
    assert all(0 <= i < TINY["vocab_size"] for i in a[2].ids)


def test_jsonl_in_and_out(model, tmp_path):
    requests = [{"id": 1, "prompt": "What is 2 + 2?"},
                {"id": 2, "messages": [{"role": "user", "content": "Hello!"},
                                       {"role": "assistant", "content": "Hi."},
                                       {"role": "user", "content": "Reverse: stone"}]},
                {"id": 3, "prompt": "the quick brown fox"}]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in requests) + "\n\n")
    cfg = model.sampling_config(max_new_tokens=5, temperature=0.0)
    with open(tmp_path / "out.jsonl", "w") as out:
        n = chat_session.reply_jsonl(model, str(src), out, cfg, jax.random.PRNGKey(0),
                                     batch_size=2, system="Be brief.")
    got = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert n == 3 and [{k: v for k, v in g.items() if k != "reply"} for g in got] == requests
    # The first batch (two rows) is the sampler's greedy output on the same layout.
    _, conversations = chat_session.read_requests(str(src), "Be brief.")
    assert conversations[1][0] == {"role": "system", "content": "Be brief."}
    prompts = [model.template.encode_prompt(c) for c in conversations]
    want = _direct(model, prompts[:2], cfg, jax.random.fold_in(jax.random.PRNGKey(0), 0),
                   policy.bucket(max(map(len, prompts))))
    for g, ids in zip(got[:2], want, strict=True):
        assert g["reply"] == model.tokenizer.decode(
            ids[:-1] if ids[-1] in model.stop_ids else ids)


def test_bad_requests_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"messages": [{"role": "robot", "content": "x"}]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2, field 'messages\[0\].role'"):
        chat_session.read_requests(str(bad))
    bad.write_text('{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="line 1, field 'prompt': missing"):
        chat_session.read_requests(str(bad))
    bad.write_text('{"prompt": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2: not JSON"):
        chat_session.read_requests(str(bad))


def test_model_specs_that_cannot_chat(tmp_path):
    with pytest.raises(ValueError, match="nothing to say"):
        chat_session.load_chat_model("scratch")
    with pytest.raises(ValueError, match="'nope:x'"):
        chat_session.load_chat_model("nope:x")
    with pytest.raises(FileNotFoundError, match="config.json"):
        chat_session.load_chat_model(f"hf:{tmp_path}")


class _Lines:
    """A non-terminal input stream."""

    def __init__(self, text):
        self.lines = text.splitlines(keepends=True)

    def isatty(self):
        return False

    def readline(self):
        return self.lines.pop(0) if self.lines else ""


def test_interact_commands(model):
    import io

    cfg = model.sampling_config(max_new_tokens=4, temperature=0.0)
    session = chat_session.ChatSession(model, cfg)
    out, notes = io.StringIO(), io.StringIO()
    n = chat_session.interact(session, _Lines("Hello!\n\n/reset\nHello!\n/exit\nNever\n"),
                              out, notes)
    first = chat_session.ChatSession(model, cfg).send("Hello!").text
    assert n == 2 and out.getvalue() == f"{first}\n{first}\n"
    assert "(conversation cleared)" in notes.getvalue()
    assert session.messages[0]["content"] == "Hello!" and len(session.messages) == 2


class _Chunks:
    """A text sink that records each write (one per streamed step, at most)."""

    def __init__(self):
        self.chunks = []

    def write(self, text):
        self.chunks.append(text)

    def flush(self):
        pass


def test_streamed_reply_arrives_in_steps_and_equals_the_reply(model):
    cfg = model.sampling_config(max_new_tokens=12, temperature=0.0)
    sink = _Chunks()
    streamed = chat_session.ChatSession(model, cfg, stream=sink)
    reply = streamed.send("What is 2 + 2?")
    plain = chat_session.ChatSession(model, cfg).send("What is 2 + 2?")
    assert reply.ids == plain.ids  # the callback changes nothing the sampler computes
    assert "".join(sink.chunks) == reply.text + "\n"
    # Written while decoding: one chunk per step that added text, then the newline.
    assert len(sink.chunks) > 2 and sink.chunks[-1] == "\n"
    n = chat_session.interact(streamed, _Lines("Hi\n/exit\n"), sink, _Chunks())
    assert n == 1 and "".join(sink.chunks).endswith(streamed.messages[-1]["content"] + "\n")


def test_token_stream_waits_for_whole_characters_and_hides_the_stop_id(model):
    tok = model.tokenizer
    ids = tok.encode("Ünï") + [model.stop_ids[0]]
    sink = _Chunks()
    stream = chat_session.TokenStream(tok, model.stop_ids, sink)
    for i, t in reversed(list(enumerate(ids))):  # out of order: shown once contiguous
        stream(i, np.asarray([t]), np.asarray([True]))
    assert "".join(sink.chunks) == "Ünï" and "\ufffd" not in "".join(sink.chunks)


@pytest.mark.slow
def test_workdir_uses_the_runs_tokenizer_and_template(tmp_path):
    from jaxalign.train import train

    workdir = tmp_path / "run"
    train(preset("sft", "test", **{"train.steps": 2, "checkpoint.save_every": 2,
                                   "data.eval": "", "metrics.tensorboard": False}), str(workdir))
    model = chat_session.load_chat_model(f"workdir:{workdir}")
    assert model.tokenizer.name == "builtin:world" and model.template.name == "plain"
    cfg = model.sampling_config(max_new_tokens=8, temperature=0.0)
    reply = chat_session.ChatSession(model, cfg).send("What is 2 + 3?")
    prompt = model.template.encode_prompt([{"role": "user", "content": "What is 2 + 3?"}])
    (want,) = _direct(model, [prompt], cfg, jax.random.PRNGKey(0), policy.bucket(len(prompt)))
    assert reply.ids == want
    # A bare directory is a workdir too.
    same = chat_session.load_chat_model(str(workdir))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(same.params),
                                                    jax.tree.leaves(model.params), strict=True))


def _chat(*args, stdin=""):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "launch.chat", *args], input=stdin,
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


@pytest.mark.slow
def test_interactive_through_a_pipe(model, hf_dir):
    proc = _chat(f"--model=hf:{hf_dir}", "--temperature=0", "--max_new_tokens=6",
                 stdin="Hello!\nWhat is 2 + 2?\n/exit\nnever read\n")
    assert proc.returncode == 0, proc.stderr
    cfg = model.sampling_config(max_new_tokens=6, temperature=0.0)
    session = chat_session.ChatSession(model, cfg)
    want = [session.send("Hello!").text, session.send("What is 2 + 2?").text]
    assert proc.stdout == "".join(f"{r}\n" for r in want)
    assert "chatting with" in proc.stderr

    one = _chat(f"--model=hf:{hf_dir}", "--temperature=0", "--max_new_tokens=6",
                "--prompt=Hello!")
    assert one.returncode == 0 and one.stdout == f"{want[0]}\n"
    bad = _chat(f"--model=hf:{hf_dir}", "--workdir=x")
    assert bad.returncode == 2 and bad.stderr == (
        "error: give exactly one of --workdir and --model\n")
