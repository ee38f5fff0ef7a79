"""jaxtp.hf.tokenizer against transformers on tiny checkpoints built here (no network, CPU only).

Two byte-level BPE tokenizers are trained in-test: a Llama-3-style one (BOS added by a TemplateProcessing
post-processor, template in tokenizer_config.json) and a Qwen2-style ChatML one (template in chat_template.jinja).
A third, legacy-style checkpoint carries a named template list and special_tokens_map.json. Every encode,
decode and rendered chat must equal what `transformers.AutoTokenizer` gives for the same directory.
"""

import json
import shutil

import jinja2.exceptions
import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import BPE

from jaxtp.hf.tokenizer import tokenizer

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.timeout(120)

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. What's the weather in Paris today?",
    "Héllo wörld — naïve café, 東京 and emoji 🙂! You are a helpful assistant.",
    "def f(x):\n    return x * 2\n\n",
    "Tabs\tand  double  spaces, numbers 12345 678.",
    "user assistant system tool get_weather location unit celsius",
] * 20
LLAMA_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXTS = [
    "Hello world",
    "  leading and trailing  ",
    "line1\nline2\r\n\n\tindented\n",
    "Héllo wörld — naïve café 東京 🙂",
    "numbers 1234567 and code: def f(x): return x*2",
    "special <|eot_id|> inside<|im_start|>text<|im_end|>",
    "don't , ok . wait ! isn't",
    "",
]

# Modelled on Llama 3.1's template: system header with dates, tools as indented JSON, role checks, trim.
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {{- "You have access to the following functions:\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant', 'ipython'] %}
        {{- raise_exception("Conversation roles must be user, assistant or ipython") }}
    {%- endif %}
    {%- if loop.first and message['role'] != 'user' %}
        {{- raise_exception("The first message after the system prompt must come from the user") }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Modelled on Qwen2.5's ChatML template: tools in <tools>, tool calls via tojson, grouped tool responses.
QWEN2_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if message.role not in ["system", "user", "assistant", "tool"] %}
        {{- raise_exception("Unknown role " + message.role) }}
    {%- elif (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Block tags on their own (indented) lines: output depends on trim_blocks and lstrip_blocks.
LEGACY_TEMPLATE = """{% for m in messages %}
  {% if loop.first %}
[{{ m.role }}]
  {% endif %}
{{ m.content }}
{% endfor %}
"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather <now> & 'later' in °C, for 東京 too",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {"type": "string"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["location"],
            },
        },
    }
]
CHATS = {
    "plain": [
        {"role": "system", "content": "  You are a helpful assistant.  \n"},
        {"role": "user", "content": "Héllo! What's 東京 like? 🙂\n\nTwo lines."},
        {"role": "assistant", "content": "It's  nice.\t"},
        {"role": "user", "content": "And <|eot_id|> or <|im_end|> as text?"},
    ],
    "no_system": [{"role": "user", "content": "hi"}],
}
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Paris and 東京?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"location": "Paris"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": {"location": "東京"}}},
        ],
    },
    {"role": "tool", "content": "18 °C"},
    {"role": "tool", "content": "<25> & sunny"},
]


def _train(specials, split, normalizer=None):
    tok = Tokenizer(BPE())
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=420,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    return tok


def _write(directory, files: dict):
    directory.mkdir()
    for name, content in files.items():
        text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False, indent=2)
        (directory / name).write_text(text, encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_tok")
    llama = _train(LLAMA_SPECIALS, LLAMA3_SPLIT)
    bos = llama.token_to_id("<|begin_of_text|>")
    llama.post_processor = processors.Sequence(
        [  # as Llama 3's tokenizer.json: BOS from the post-processor
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
                special_tokens=[("<|begin_of_text|>", bos)],
            ),
        ]
    )
    eos_ids = [llama.token_to_id(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
    dirs = {
        "llama": _write(
            root / "llama",
            {
                "tokenizer_config.json": {
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "bos_token": "<|begin_of_text|>",
                    "eos_token": "<|eot_id|>",
                    "clean_up_tokenization_spaces": True,
                    "model_max_length": 131072,
                    "chat_template": LLAMA3_TEMPLATE,
                },
                "config.json": {
                    "model_type": "llama",
                    "vocab_size": llama.get_vocab_size(),
                    "bos_token_id": bos,
                    "eos_token_id": eos_ids,
                },
                "generation_config.json": {"bos_token_id": bos, "eos_token_id": eos_ids, "do_sample": True},
            },
        )
    }
    llama.save(str(dirs["llama"] / "tokenizer.json"))

    qwen = _train(
        QWEN_SPECIALS, QWEN2_SPLIT, normalizers.NFC()
    )  # Qwen2Tokenizer rebuilds exactly these parts
    qwen.post_processor = processors.ByteLevel(trim_offsets=False)
    im_end, endoftext = qwen.token_to_id("<|im_end|>"), qwen.token_to_id("<|endoftext|>")
    dirs["qwen"] = _write(
        root / "qwen",
        {
            "tokenizer_config.json": {
                "tokenizer_class": "Qwen2Tokenizer",
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "unk_token": None,
                "errors": "replace",
                "split_special_tokens": False,
                "clean_up_tokenization_spaces": False,
                "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            },
            "chat_template.jinja": QWEN2_TEMPLATE,
            "config.json": {
                "model_type": "qwen2",
                "vocab_size": qwen.get_vocab_size(),
                "eos_token_id": endoftext,
            },
            "generation_config.json": {"eos_token_id": [im_end, endoftext], "pad_token_id": endoftext},
        },
    )
    qwen.save(str(dirs["qwen"] / "tokenizer.json"))

    # Legacy layout: named template list, special tokens from special_tokens_map.json (a pad token that is not in
    # tokenizer.json yet, which transformers adds), eos only in config.json.
    dirs["legacy"] = _write(
        root / "legacy",
        {
            "tokenizer_config.json": {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "chat_template": [
                    {"name": "default", "template": LEGACY_TEMPLATE},
                    {
                        "name": "tool_use",
                        "template": "{{ tools | tojson }}|{{ messages | length }}|{{ pad_token }}",
                    },
                ],
            },
            "special_tokens_map.json": {
                "bos_token": "<|begin_of_text|>",
                "eos_token": "<|end_of_text|>",
                "pad_token": {
                    "content": "<|pad|>",
                    "lstrip": False,
                    "normalized": False,
                    "rstrip": False,
                    "single_word": False,
                },
            },
            "config.json": {"model_type": "llama", "eos_token_id": eos_ids[0]},
        },
    )
    shutil.copy(dirs["llama"] / "tokenizer.json", dirs["legacy"] / "tokenizer.json")

    # Bare: tokenizer.json and special tokens only; eos falls back to tokenizer_config.json, no chat template.
    dirs["bare"] = _write(
        root / "bare",
        {"tokenizer_config.json": {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>"}}},
    )
    shutil.copy(dirs["llama"] / "tokenizer.json", dirs["bare"] / "tokenizer.json")
    return dirs


@pytest.fixture(scope="module")
def pairs(ckpts):
    """name -> (jaxtp tokenizer, transformers tokenizer) for the checkpoints transformers loads."""
    return {
        name: (tokenizer(d), transformers.AutoTokenizer.from_pretrained(str(d)))
        for name, d in ckpts.items()
        if name != "bare"
    }


@pytest.mark.parametrize("name", ["llama", "qwen", "legacy"])
def test_encode_decode_match_transformers(pairs, name):
    ours, hf = pairs[name]
    for text in TEXTS + ["a<|pad|>b"]:
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == hf.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True), text
        offset_ids, offsets = ours.encode_with_offsets(text)
        assert offset_ids == hf.encode(text, add_special_tokens=False) and len(offsets) == len(offset_ids), (
            text
        )
        assert offsets == [
            tuple(o)
            for o in hf(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        ], text
    every_id = list(range(ours.vocab_size))  # lone byte-level pieces decode to U+FFFD in both
    assert ours.decode(every_id) == hf.decode(every_id)
    assert ours.vocab_size == len(hf)
    for attr in ("bos_token", "eos_token", "pad_token", "bos_token_id", "pad_token_id"):
        assert getattr(ours, attr) == getattr(hf, attr), attr


def test_llama_adds_bos_and_reads_eos_list(pairs, ckpts):
    ours, _ = pairs["llama"]
    assert ours.encode("hi")[0] == ours.bos_token_id
    assert ours.encode("hi", add_special_tokens=False) == ours.encode("hi")[1:]
    gen = transformers.GenerationConfig.from_pretrained(str(ckpts["llama"]))
    assert ours.eos_token_ids == gen.eos_token_id and len(ours.eos_token_ids) == 3
    assert ours.eos_token_id == ours.eos_token_ids[0]


def test_eos_fallbacks(pairs, ckpts):
    qwen, legacy = pairs["qwen"][0], pairs["legacy"][0]
    assert qwen.eos_token_ids == [qwen.encode("<|im_end|>")[0], qwen.encode("<|endoftext|>")[0]]
    assert legacy.eos_token_ids == [
        legacy.encode("<|end_of_text|>", add_special_tokens=False)[0]
    ]  # config.json
    bare = tokenizer(ckpts["bare"])  # only tokenizer_config.json's eos_token, here an AddedToken dict
    assert bare.eos_token == "<|eot_id|>" and bare.eos_token_ids == [bare.encode("<|eot_id|>", False)[0]]


@pytest.mark.parametrize("name", ["llama", "qwen"])
@pytest.mark.parametrize("chat", ["plain", "no_system", "tools"])
def test_chat_template_matches_transformers(pairs, name, chat):
    ours, hf = pairs[name]
    messages, kwargs = (TOOL_CHAT, {"tools": TOOLS}) if chat == "tools" else (CHATS[chat], {})
    if (
        name == "llama" and chat == "tools"
    ):  # Llama's template takes no tool messages; date_string is a template kwarg
        messages, kwargs = CHATS["plain"][1:], {"tools": TOOLS, "date_string": "01 Jan 2025"}
    for gen_prompt in (True, False):
        text = ours.apply_chat_template(messages, add_generation_prompt=gen_prompt, **kwargs)
        assert text == hf.apply_chat_template(
            messages, add_generation_prompt=gen_prompt, tokenize=False, **kwargs
        )
        ids = ours.apply_chat_template(messages, add_generation_prompt=gen_prompt, tokenize=True, **kwargs)
        assert ids == hf.apply_chat_template(
            messages, add_generation_prompt=gen_prompt, return_dict=False, **kwargs
        )
        assert ids == ours.encode(text, add_special_tokens=False)
    if name == "llama":  # the template writes BOS itself; tokenize=True must not add a second one
        assert ids.count(ours.bos_token_id) == 1


def test_named_templates_and_raise_exception(pairs):
    ours, hf = pairs["legacy"]
    messages = CHATS["plain"]
    assert ours.apply_chat_template(messages) == hf.apply_chat_template(messages, tokenize=False)
    tool_use = ours.apply_chat_template(messages, tools=TOOLS)  # tools pick the "tool_use" template
    assert tool_use == hf.apply_chat_template(messages, tools=TOOLS, tokenize=False) and tool_use.endswith(
        "|4|<|pad|>"
    )
    llama, _ = pairs["llama"]
    with pytest.raises(jinja2.exceptions.TemplateError, match="roles must be user, assistant or ipython"):
        llama.apply_chat_template([{"role": "robot", "content": "beep"}])


def test_template_inputs_prepared_like_transformers(pairs):
    """None fields dropped, reasoning aliased, kwargs over special tokens, numpy made plain, {% generation %} kept."""
    ours, hf = pairs["qwen"]
    template = (
        "{% for m in messages %}{{ m.role }}|{{ m.content is defined }}|{% generation %}"
        "{{ m.thinking }}|{{ m.reasoning_content }}{% endgeneration %}\n{% endfor %}"
        "{{ eos_token }}|{{ pad_token }}|{{ n + 1 }}|{{ flag }}"
    )
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "reasoning": "hmm"}]
    kwargs = {"chat_template": template, "eos_token": "<EOS>", "n": np.int64(41), "flag": np.bool_(False)}
    text = ours.apply_chat_template(messages, **kwargs)
    assert text == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
    assert text.endswith("hmm<EOS>|<|endoftext|>|42|False") and "assistant|False|hmm|hmm" in text
    assert ours.decode(np.array(ours.encode(text))) == text


UNSAFE = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ raise_exception.__globals__.keys() }}",
    "{{ messages.append({'role': 'evil'}) }}",
    "{% set d = {} %}{{ d.update(a=1) }}",
    "{{ messages[0].pop('content') }}",
    "{% set ns = namespace(_secret=1) %}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
]


@pytest.mark.parametrize("template", UNSAFE)
def test_template_runs_sandboxed(pairs, template):
    ours, hf = pairs["qwen"]
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(jinja2.exceptions.SecurityError):
        ours.apply_chat_template(messages, chat_template=template)
    with pytest.raises(jinja2.exceptions.SecurityError):  # transformers refuses it the same way
        hf.apply_chat_template(messages, chat_template=template, tokenize=False)
    assert messages == [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages, chat_template="{{ ''.__class__ }}") == ""  # one step: Undefined


def test_bad_inputs(ckpts, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory") as e:
        tokenizer(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"has no tokenizer\.json; .*save_pretrained") as e:
        tokenizer(empty)
    assert "\n" not in str(e.value)
    spm = tmp_path / "spm"
    spm.mkdir()
    (spm / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(FileNotFoundError, match=r"sentencepiece tokenizer\.model.*save_pretrained"):
        tokenizer(spm)
    bare = tokenizer(ckpts["bare"])
    with pytest.raises(ValueError, match="no chat template.*chat_template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="empty conversation"):
        tokenizer(ckpts["llama"]).apply_chat_template([])
